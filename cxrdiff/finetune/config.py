"""What `cxrdiff finetune` is asked for (`FinetuneConfig`) and the names of what a run folder holds."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar, Literal

from cxrdiff.choices import DeidMarkers

STEP = "finetune"


DEFAULT_STEPS = {True: 30_000, False: 60_000}  # frozen / learnable text encoder (the paper)


CHECKPOINTS = "checkpoints"


TRAIN_LOG = "train_log.jsonl"


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Everything that defines a fine-tuning run; saved in the output manifest and every checkpoint."""

    # Fields that do not change what is trained: a run folder resumes (or, finished, extends) under other
    # values of these; any other field differing is refused by the folder claim.
    NOT_SETTINGS: ClassVar[tuple[str, ...]] = (
        "out",
        "steps",
        "per_device_batch_size",
        "mixed_precision",
        "gradient_checkpointing",
        "checkpoint_every",
        "keep_checkpoints",
        "export_weights",
        "log_every",
        "validation_prompts",
        "validate_every",
        "validation_steps",
        "stop_after_step",
        "compile",
        "fused_adamw",
        "tf32",
        "channels_last",
    )

    data: Path | None = None
    base_model: Path | None = None
    out: Path | None = None
    frozen_text: bool | None = None
    steps: int | None = None
    batch_size: int = 256
    per_device_batch_size: int | None = None
    lr: float = 5e-5
    text_lr: float | None = None
    ucg_no_finding: float = 0.3
    ucg_caption: float = 0.1  # COCO data (prepare --format coco): P(empty prompt) for any caption, the common rule
    prompt_source: str = "impression"
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    ema: bool = False
    ema_decay: float = 0.9999
    export_weights: Literal["raw", "ema"] = "raw"
    seed: int = 0
    max_grad_norm: float = 1.0
    snr_gamma: float | None = None
    latent_sampling: Literal["sample", "mean"] = "sample"
    weight_decay: float = 0.01
    log_every: int = 10
    validation_prompts: tuple[str, ...] = ()
    validate_every: int = 0
    validation_steps: int = 25
    stop_after_step: int | None = None  # act as if preempted after this step (tests, SLURM drills)
    # speed levers (cxrdiff.speed): same results up to float noise, so a resumed run may change them
    compile: bool = False  # torch.compile the UNet
    fused_adamw: bool = False  # fused AdamW kernel (GPUs)
    tf32: bool = False  # TF32 matmuls and convolutions (NVIDIA GPUs)
    channels_last: bool = False  # NHWC memory format for the UNet
    # "___" (MIMIC's de-identification marker) in the training text: keep (the paper's; then not part of the
    # settings key, so earlier run folders keep theirs) or strip it and the spaces around it (its effect measured)
    deid_markers: DeidMarkers = "keep"
