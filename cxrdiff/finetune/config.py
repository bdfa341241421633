"""What `cxrdiff finetune` is asked for (`FinetuneConfig`) and the names of what a run folder holds."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from cxrdiff.choices import DeidMarkers, ReportTo
from cxrdiff.config import Range

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
        "text_encoder",  # by identity (the hash of its files), see inputs.run_settings
        "trust_remote_code",  # permission to run the encoder's own code, not a change of what is trained
        "allow_world_change",
        "report_to",
    )
    KEY_NEUTRAL: ClassVar[dict[str, Any]] = {"deid_markers": "keep"}  # the paper's text joins no key (config.settings)

    data: Path | None = None
    base_model: Path | None = None
    out: Path | None = None
    frozen_text: bool | None = None
    text_encoder: Path | None = None  # a local Hugging Face text model to condition on (default: the base model's)
    trust_remote_code: bool = False  # let a --text-encoder whose model code ships in its folder run that code
    steps: Annotated[int | None, Range(ge=1)] = None
    batch_size: Annotated[int, Range(ge=1)] = 256
    per_device_batch_size: Annotated[int | None, Range(ge=1)] = None
    lr: Annotated[float, Range(gt=0.0)] = 5e-5
    text_lr: Annotated[float | None, Range(gt=0.0)] = None
    ucg_no_finding: Annotated[float, Range(ge=0.0, le=1.0)] = 0.3
    # COCO data (prepare --format coco): P(empty prompt) for any caption, the common rule
    ucg_caption: Annotated[float, Range(ge=0.0, le=1.0)] = 0.1
    prompt_source: str = "impression"
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: Annotated[int, Range(ge=1)] = 500
    keep_checkpoints: Annotated[int, Range(ge=1)] = 2
    ema: bool = False  # with LoRA: an EMA of the UNet's adapters (what trains)
    ema_decay: Annotated[float, Range(ge=0.0, le=1.0)] = 0.9999
    export_weights: Literal["raw", "ema"] = "raw"
    seed: Annotated[int, Range(ge=0)] = 0
    max_grad_norm: Annotated[float, Range(ge=0.0)] = 1.0
    snr_gamma: Annotated[float | None, Range(gt=0.0)] = None
    latent_sampling: Literal["sample", "mean"] = "sample"
    weight_decay: Annotated[float, Range(ge=0.0)] = 0.01
    log_every: Annotated[int, Range(ge=1)] = 10
    validation_prompts: tuple[str, ...] = ()
    validate_every: Annotated[int, Range(ge=0)] = 0
    validation_steps: Annotated[int, Range(ge=1)] = 25
    # LoRA (cxrdiff.finetune.lora): None trains every weight (the paper); R adds rank-R adapters and trains
    # only them (the UNet's at `lora_targets`; with a learnable text encoder its attention projections too)
    lora_rank: Annotated[int | None, Range(ge=1)] = None
    # the adapters' scale is alpha / rank; default: the rank (scale 1)
    lora_alpha: Annotated[float | None, Range(gt=0.0)] = None
    lora_dropout: Annotated[float, Range(ge=0.0, lt=1.0)] = 0.0
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # the UNet's attention projections
    # the text encoder's adapters (--learnable-text); default: lora_rank
    text_lora_rank: Annotated[int | None, Range(ge=1)] = None
    # act as if preempted after this step (tests, SLURM drills)
    stop_after_step: Annotated[int | None, Range(ge=1)] = None
    # speed levers (cxrdiff.speed): same results up to float noise, so a resumed run may change them
    compile: bool = False  # torch.compile the UNet
    fused_adamw: bool = False  # fused AdamW kernel (GPUs)
    tf32: bool = False  # TF32 matmuls and convolutions (NVIDIA GPUs)
    channels_last: bool = False  # NHWC memory format for the UNet
    # "___" (MIMIC's de-identification marker) in the training text: keep (the paper's) or strip it and the spaces
    # around it (its effect measured)
    deid_markers: DeidMarkers = "keep"
    # resume a checkpoint saved by another number of processes: the data continues at `samples_seen`; ranks
    # without their own saved generators get ones seeded from (seed, step, rank) (docs/slurm.md)
    allow_world_change: bool = False
    # where loss, lr, images/s, memory and validation images go besides train_log.jsonl: "auto" is TensorBoard
    # when it is installed, else none (accelerate's trackers; W&B runs offline unless WANDB_MODE is set)
    report_to: ReportTo = "auto"
