"""What a finished `prepare` folder records and returns, for every data format: the units read back (rows
per part, images skipped at encoding), `skipped.csv`, the latents' record in the manifest, and the result."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from cxrdiff.artifacts import write_text
from cxrdiff.console import log
from cxrdiff.prepare.encode import SKIPPED_COLUMNS, STATE


def gather_units(
    out: Path, units: list[str], skipped: list[dict[str, Any]]
) -> tuple[dict[str, int], dict[str, Counter]]:
    """Rows written per part (train, test, ms_cxr) and the images skipped at encoding by reason, read back from
    the units' Parquet files and skip lists (those skips appended to `skipped`)."""
    import pyarrow.parquet as pq

    rows = {"train": 0, "test": 0, "ms_cxr": 0}
    reasons: dict[str, Counter] = {part: Counter() for part in rows}
    for unit in units:
        part = "ms_cxr" if unit == "ms_cxr" else unit.split("-")[0]
        rows[part] += pq.read_metadata(out / f"{unit}.parquet").num_rows
        unit_skips = json.loads((out / STATE / f"{unit}.skipped.json").read_text())
        reasons[part].update(skip["reason"] for skip in unit_skips)
        skipped.extend(unit_skips)
    return rows, reasons


def write_skipped(out: Path, skipped: list[dict[str, Any]]) -> None:
    """`skipped.csv` (SKIPPED_COLUMNS): every planned row that did not become a prepared row, with why."""
    import pandas as pd

    write_text(out / "skipped.csv", pd.DataFrame(skipped, columns=list(SKIPPED_COLUMNS)).to_csv(index=False))


def prepared_result(out: Path, rows: dict[str, int], shards: int, skipped: int, resolution: int, latent_shape: Any,
                    seconds: float, data_format: str | None = None) -> dict[str, Any]:  # fmt: skip
    """What `prepare` returns (and the CLI prints) for a folder in MIMIC's layout: rows per part, train shards,
    skipped rows, the frame and the time (`data_format` after `out` for the public sets)."""
    return {
        "out": str(out),
        **({"format": data_format} if data_format is not None else {}),
        "train_rows": rows["train"],
        "train_shards": shards,
        "test_rows": rows["test"],
        "ms_cxr_rows": rows["ms_cxr"],
        "skipped": skipped,
        "resolution": resolution,
        "latent_shape": list(latent_shape),
        "seconds": round(seconds, 1),
    }


def latent_record(base_model: Path, resolution: int, latent_shape: Any, scaling_factor: float) -> dict[str, Any]:
    """The prepared latents' geometry and provenance, as every format's manifest records them (finetune and
    ground check them against the base model they are given)."""
    from cxrdiff.models import vae_fingerprint

    return {
        "resolution": resolution,
        "latent_shape": list(latent_shape),
        "scaling_factor": scaling_factor,
        "latent_storage": "mean+logvar",
        "latent_dtype": "float16",
        "vae_fingerprint": vae_fingerprint(base_model),
    }


def warn_empty_parts(out: Path, rows: dict[str, int]) -> list[str]:
    """Say out loud which prepared parts ended with no rows (every candidate skipped or filtered): a later
    `finetune`, `sample` or `ground` on them would have nothing to read. Returns those parts."""
    empty = [part for part, n in rows.items() if not n]
    if empty:
        log.warning("prepare %s: no rows in %s; every candidate was left out (reasons in %s and the manifest's "
                    "counts)", out, ", ".join(empty), out / "skipped.csv")  # fmt: skip
    return empty
