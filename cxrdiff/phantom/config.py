"""What `cxrdiff phantom` is asked for (`PhantomConfig`), its number checks, and the file names its trees share."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

from cxrdiff.artifacts import StepFolder
from cxrdiff.choices import PhantomKind
from cxrdiff.config import settings
from cxrdiff.errors import InputError

STEP = "phantom"
MS_CXR_FILE = "MS_CXR_Local_Alignment_v1.0.0.csv"
TRUTH_FILE = "phantom_truth.json"


@dataclasses.dataclass(frozen=True)
class PhantomConfig:
    """What `cxrdiff phantom` writes; the same settings write the same bytes (`out` and `workers` aside)."""

    out: Path
    patients: int = 100
    seed: int = 0
    size: int = 512
    dicom_fraction: float = 0.1
    preview: bool = False
    workers: int | None = None  # image processes; None: as many as pay for themselves, 0 or 1: this one
    kind: PhantomKind = "mimic"  # coco: a COCO-layout set (cxrdiff.phantom.coco)

    NOT_SETTINGS: ClassVar[tuple[str, ...]] = ("out", "workers")
    FORMAT_FIELD: ClassVar[str] = "kind"  # joins the settings key only when not "mimic" (config.settings)
    FORMAT_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {"mimic": (), "coco": ()}


def check_numbers(config: PhantomConfig) -> None:
    """Refuse bad numbers before anything is drawn."""
    if config.patients < 1:
        raise InputError(f"--patients: must be at least 1, got {config.patients}")
    if config.size < 32:
        raise InputError(f"--size: must be at least 32 pixels, got {config.size}")
    if not 0.0 <= config.dicom_fraction <= 1.0:
        raise InputError(f"--dicom-fraction: must be between 0 and 1, got {config.dicom_fraction}")


def claim(config: PhantomConfig) -> StepFolder:
    """Claim `--out` for this phantom (a finished folder with the same settings comes back finished)."""
    return StepFolder.claim(config.out, STEP, settings(config))
