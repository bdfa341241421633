"""`cxrdiff model`: write and inspect base-model folders (the folder itself, load and save, is `cxrdiff.models`).

One function per subcommand; each imports its module when called, so that `--help` stays instant:
`tiny` → `model.tiny`, `random` → `model.published`, `pretrain-text` / `pretrain-bert` → `model.pretrain_text` /
`model.pretrain_bert` (one training loop, `model.pretrain`), `info` → `models.describe`, `checkpoint` → the
`finetune` step's export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_tiny(
    out: Path, resolution: int, unet_channels: str, text_width: int, prediction_type: str, seed: int,
    text_encoder: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """`model tiny`: a tiny random SD2-shaped model; `text_encoder`, a `pretrain-text` folder to condition on."""
    from cxrdiff.model.tiny import write_tiny_model_cli

    return write_tiny_model_cli(out, resolution, unet_channels, text_width, prediction_type, seed, text_encoder)


def write_random(out: Path, like: str, seed: int, text_encoder_like: str | None = None) -> dict[str, Any]:
    """`model random`: a released architecture (`like`) with seeded random weights."""
    from cxrdiff.model.published import write_random_model

    return write_random_model(out, like, seed, text_encoder_like)


def info(path: Path) -> dict[str, Any]:
    """`model info`: a model folder's resolution, latent shape, prediction type and sizes."""
    from cxrdiff.models import describe

    return describe(path)


def export_checkpoint(run: Path, step: int, out: Path) -> dict[str, Any]:
    """`model checkpoint`: a finished run's kept checkpoint as a model folder."""
    from cxrdiff.finetune import export_checkpoint as export

    return export(run, step, out)
