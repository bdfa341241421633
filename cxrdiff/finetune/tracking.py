"""Where a run's numbers and validation images go besides `train_log.jsonl`: accelerate's trackers
(`finetune --report-to`), TensorBoard or Weights & Biases, both optional installs (`pip install 'cxrdiff[track]'`)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.errors import InputError

INSTALL = {"tensorboard": "tensorboard", "wandb": "wandb"}  # tracker -> the package it needs


def has_tensorboard() -> bool:
    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def installed(tracker: str) -> bool:
    return has_tensorboard() if tracker == "tensorboard" else importlib.util.find_spec(INSTALL[tracker]) is not None


def chosen_tracker(report_to: str, out: Path) -> str | None:
    """The accelerate tracker for `--report-to` (None: the log file only). "auto" is TensorBoard when installed.
    W&B writes into OUT/logs and runs offline unless WANDB_MODE says otherwise (`wandb sync` uploads it later),
    so a compute node without network trains all the same."""
    if report_to == "none" or (report_to == "auto" and not has_tensorboard()):
        return None
    tracker = "tensorboard" if report_to == "auto" else report_to
    if not installed(tracker):
        raise InputError(f"--report-to {tracker}: {INSTALL[tracker]} is not installed "
                         "(pip install 'cxrdiff[track]'), or choose --report-to none")  # fmt: skip
    if tracker == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", os.fspath(out / "logs"))
        (out / "logs").mkdir(parents=True, exist_ok=True)
    return tracker


def track_images(accelerator: Any, images: list[Any], step: int) -> None:
    """The validation images (PIL, one per prompt) to every tracker of the run, under `validation`."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":  # one (N, H, W, C) batch
            tracker.log_images({"validation": np.stack([np.asarray(i) for i in images])}, step=step,
                               dataformats="NHWC")  # fmt: skip
        else:
            tracker.log_images({"validation": images}, step=step)
