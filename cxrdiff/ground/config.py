"""`cxrdiff ground`'s settings, the one record every reader returns (`GroundingInput`), and the settings key."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, ClassVar

import numpy as np

from cxrdiff.artifacts import input_identity
from cxrdiff.choices import BoxMode, CnrKind, Frame, GroundMode, LatentSampling, SamplePrecision
from cxrdiff.config import Range, settings

STEP = "ground"


@dataclasses.dataclass(frozen=True)
class GroundConfig:
    """Settings of `cxrdiff ground` (defaults follow the paper)."""

    # The batch size stays in the settings: the resume points (parts) are numbered by batch.
    NOT_SETTINGS: ClassVar[tuple[str, ...]] = (
        "out", "overlays", "model", "data", "image", "allow_scaling_mismatch", "compile", "tf32", "channels_last",
        "shard", "finalize", "dist_timeout",
    )  # fmt: skip
    # How the settings key spells two settings (config.settings): the noise seeds as "runs", the precision as
    # "dtype" in torch's names.
    KEY_SPELLING: ClassVar[dict[str, tuple[str, dict[str, str]]]] = {
        "noise_seeds": ("runs", {}),
        "precision": ("dtype", {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}),
    }

    model: Path | None = None
    out: Path | None = None
    data: Path | None = None  # ms_cxr.parquet from `cxrdiff prepare`
    image: Path | None = None  # single-image mode, with `prompt`
    prompt: str | None = None
    word: tuple[str, ...] | None = None
    steps: Annotated[int, Range(ge=1)] = 50
    window: Annotated[int, Range(ge=1)] = 40
    mode: GroundMode = "noise"
    # classifier-free guidance of the grounding pass (invert mode steps with it); far above the usual 1-20 the
    # guided latents overflow to NaN (1e30 did), so the range ends at 50
    guidance: Annotated[float, Range(ge=1.0, le=50.0)] = 1.0
    seed: Annotated[int, Range(ge=0)] = 0
    noise_seeds: Annotated[int, Range(ge=1)] = 1  # the grounding repeated with seeds seed..seed+N-1; mean ± std
    cnr: CnrKind = "signed"
    boxes: BoxMode = "union"  # union: all boxes of the image and class; per-phrase: the phrase's; per-box: each
    frame: Frame = "prepared"
    latent: LatentSampling = "sample"  # sample: a posterior draw per sample and run (the reference code's)
    limit: Annotated[int | None, Range(ge=1)] = None
    batch_size: Annotated[int, Range(ge=1)] = 8
    # Table 6: words occurring more than this many times in a class's phrases
    min_word_count: Annotated[int, Range(ge=0)] = 25
    overlays: bool = True
    precision: SamplePrecision = "auto"  # as sample's: auto = bf16 on CUDA, fp32 (no) on CPU
    compile: bool = False  # speed levers (cxrdiff.speed): torch.compile the UNet,
    tf32: bool = False  # TF32 matmuls (NVIDIA GPUs),
    channels_last: bool = False  # NHWC UNet
    allow_scaling_mismatch: bool = False  # ground latents prepared with another VAE scaling factor anyway
    shard: str | None = None  # I/N or slurm (cxrdiff.shards): this job's share of the (run, batch) pairs
    finalize: bool = False  # only merge the parts once every shard's batches exist
    dist_timeout: Annotated[int, Range(ge=1)] = 1800  # seconds a rank waits for the others in a collective


@dataclasses.dataclass
class GroundingInput:
    """One image + phrase (+ the regions of one category) to ground: what every format's reader returns."""

    sample: str
    phrase: str
    latent: np.ndarray | None  # (C, H, W), unscaled VAE mean
    logvar: np.ndarray | None = None  # (C, H, W), the posterior's log-variance (for `--latent sample`)
    dicom_id: str = ""
    category: str = ""
    boxes: list[list[float]] = dataclasses.field(default_factory=list)  # prepared frame, (x, y, w, h)
    boxes_original: list[list[float]] = dataclasses.field(default_factory=list)
    width: int = 0
    height: int = 0
    image_path: str = ""
    mask: np.ndarray | None = None  # a mask format's region in the prepared frame (then `boxes` are unused)
    word: str = ""  # the caption's word that names the category, where the format records one (its tokens are the map)
    # the side of the patient the phrase names (`metrics.laterality.named_side`), where the format's pictures are
    # radiographs with the patient's left on the image's right: "left", "right", "bilateral"; "" none, or no patient
    side: str = ""


def ground_settings(config: GroundConfig) -> dict[str, Any]:
    """The settings key's content: the config, with the model, data and image by their identity."""
    given = {name: input_identity(getattr(config, name)) for name in ("data", "image") if getattr(config, name)}
    return settings(config, model=input_identity(config.model), **given)
