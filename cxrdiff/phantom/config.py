"""What `cxrdiff phantom` is asked for (`PhantomConfig`), its number checks, and the file names its trees share."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, ClassVar

from cxrdiff.artifacts import StepFolder
from cxrdiff.choices import PhantomKind
from cxrdiff.config import Range, check_ranges, settings

STEP = "phantom"
MS_CXR_FILE = "MS_CXR_Local_Alignment_v1.0.0.csv"
TRUTH_FILE = "phantom_truth.json"


@dataclasses.dataclass(frozen=True)
class PhantomConfig:
    """What `cxrdiff phantom` writes; the same settings write the same bytes (`out` and `workers` aside)."""

    out: Path
    patients: Annotated[int, Range(ge=1)] = 100
    seed: Annotated[int, Range(ge=0)] = 0
    size: Annotated[int, Range(ge=32)] = 512
    dicom_fraction: Annotated[float, Range(ge=0.0, le=1.0)] = 0.1
    preview: bool = False
    # image processes; None: as many as pay for themselves, 0 or 1: this one
    workers: Annotated[int | None, Range(ge=0)] = None
    kind: PhantomKind = "mimic"  # coco: a COCO-layout set (cxrdiff.phantom.coco)

    NOT_SETTINGS: ClassVar[tuple[str, ...]] = ("out", "workers")
    FORMAT_FIELD: ClassVar[str] = "kind"  # joins the settings key only when not "mimic" (config.settings)
    FORMAT_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {"mimic": (), "coco": ()}


def check_numbers(config: PhantomConfig) -> None:
    """Refuse bad numbers (each field's declared `Range`) before anything is drawn."""
    check_ranges(config)


def claim(config: PhantomConfig) -> StepFolder:
    """Claim `--out` for this phantom (a finished folder with the same settings comes back finished)."""
    return StepFolder.claim(config.out, STEP, settings(config))
