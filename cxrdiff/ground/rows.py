"""What every format's reader checks the same way: the columns it needs are there, there are rows, and all
latents have one shape; and each row's latent (the posterior's mean, with its log-variance for
`--latent sample`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.errors import InputError
from cxrdiff.ground.config import GroundConfig


def checked_rows(table: Any, columns: tuple[str, ...], config: GroundConfig, path: Path, kind: str) -> list[dict]:
    """The table's rows (up to `--limit`), once the columns the reader needs are there; `kind` names the file
    a reader expects (e.g. "an ms_cxr.parquet") in the error."""
    wanted = (*columns, "latent_logvar") if config.latent == "sample" else columns
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise InputError(f"--data {path}: missing column(s) {', '.join(missing)}; expected {kind}")
    rows = table.to_pylist()[: config.limit]
    if not rows:
        raise InputError(f"--data {path}: no rows")
    return rows


def row_latents(row: dict, config: GroundConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """A row's unscaled latent mean (C, H, W) and, for `--latent sample`, its log-variance."""
    from cxrdiff.data import latent_from_bytes

    shape = tuple(int(s) for s in row["latent_shape"])
    logvar = latent_from_bytes(row["latent_logvar"], shape) if config.latent == "sample" else None
    return latent_from_bytes(row["latent_mean"], shape), logvar


def check_one_shape(samples: list, path: Path) -> None:
    """The samples are batched together: their latents must have one shape."""
    shapes = {tuple(s.latent.shape) for s in samples}
    if len(shapes) != 1:
        raise InputError(f"--data {path}: rows have different latent shapes {sorted(shapes)}")
