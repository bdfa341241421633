"""The loop that `model pretrain-text` and `model pretrain-bert` share: AdamW for `steps` steps on a loss that
the step's number alone decides (batches and masks drawn from (seed, step)), so that a run stopped anywhere and
resumed from its last state trains to the same weights."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar

import numpy as np

from cxrdiff.artifacts import atomic_path, write_text
from cxrdiff.choices import TextFallback
from cxrdiff.config import Range
from cxrdiff.console import log, progress

CHECKPOINT = "checkpoint.pt"  # the resumable state, removed once the folder is finished


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """What both pretraining steps are asked for: the reports (and images) to learn from and the training loop's
    numbers (the defaults are the demo's, chosen before any run). Each step's config adds its architecture."""

    data: Path  # a MIMIC-CXR-shaped folder: metadata CSV, files/pXX/... images and reports
    out: Path
    ms_cxr: Path | None = None  # MS-CXR's box CSV, whose images are left out; default: the one in --data (phantoms)
    text_fallback: TextFallback = "none"  # as prepare: none = impressions only (the paper's training text)
    steps: Annotated[int, Range(ge=1)] = 600
    batch_size: Annotated[int, Range(ge=2)] = 64
    lr: Annotated[float, Range(gt=0.0)] = 1e-3
    weight_decay: Annotated[float, Range(ge=0.0)] = 0.1
    held_out: Annotated[int, Range(ge=1)] = 200  # whole patients' texts kept out of training for the check
    max_pairs: Annotated[int | None, Range(ge=8)] = None
    checkpoint_every: Annotated[int, Range(ge=1)] = 200
    seed: Annotated[int, Range(ge=0)] = 0

    NOT_SETTINGS: ClassVar[tuple[str, ...]] = ("out", "checkpoint_every", "ms_cxr")  # ms_cxr: by identity


def batch_index(n: int, batch_size: int, seed: int, number: int) -> Any:
    """Batch `number`'s pair indices: shuffled epochs (no pair twice in a batch), each epoch's order a
    function of (seed, epoch) alone, so a resumed run draws exactly the batches it would have drawn."""
    import torch

    size = min(batch_size, n)
    epoch, position = divmod(number, n // size)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[position * size : (position + 1) * size]


def pretrain_loop(
    config: PretrainConfig,
    parameters: Any,
    state: Callable[[], dict[str, Any]],
    load: Callable[[dict[str, Any]], None],
    loss: Callable[[int], Any],
    out: Path,
    step_name: str,
) -> list[float]:
    """Train `parameters` on `loss(step)`; every `checkpoint_every` steps, `state()` (the model's tensors), the
    optimizer and the losses so far go to `out/checkpoint.pt`, which a re-run `load`s. Returns every step's loss."""
    import torch

    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    start, losses = 0, []
    if (out / CHECKPOINT).is_file():
        saved = torch.load(out / CHECKPOINT, weights_only=True)  # tensors and plain containers only
        load(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        start, losses = int(saved["step"]), list(saved["losses"])
        log.info("resuming pretraining at step %d of %s", start, out)
    for step in progress(range(start, config.steps), description=f"{step_name} step"):
        value = loss(step)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        losses.append(float(value.detach()))
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            with atomic_path(out / CHECKPOINT) as tmp:
                saved = {"model": state(), "optimizer": optimizer.state_dict(), "step": step + 1, "losses": losses}
                torch.save(saved, tmp)
    return losses


def write_losses(out: Path, losses: list[float]) -> dict[str, float]:
    """Every step's loss to `out/losses.csv`; returns the manifest's summary of them."""
    write_text(out / "losses.csv", "step,loss\n" + "".join(f"{i + 1},{v:.6f}\n" for i, v in enumerate(losses)))
    return {"first": losses[0], "last": losses[-1], "last_50_mean": float(np.mean(losses[-50:]))}


def pretrain_result(out: Path, manifest: dict[str, Any], **fields: str) -> dict[str, Any]:
    """What the step prints: the folder, each `name="section.key"` of its manifest, the first and last loss."""

    def at(path: str) -> Any:
        value: Any = manifest
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    return {"out": str(out), **{name: at(path) for name, path in fields.items()}} | {
        "loss_first": at("loss.first"), "loss_last": at("loss.last"),
    }  # fmt: skip
