"""What `cxrdiff prepare` is asked for: one config for every data format, whose fields `FORMAT_FIELDS` assigns."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar

from cxrdiff.artifacts import CLAIM, MANIFEST, OtherSettings, StepFolder
from cxrdiff.choices import DataFormat, DicomContrast, TextFallback
from cxrdiff.config import Range
from cxrdiff.errors import InputError
from cxrdiff.models import fingerprint_covers_weights

STEP = "prepare"


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """Settings of `cxrdiff prepare`. Inputs count by their identity (tables by size and time, the VAE by its
    fingerprint, COCO files by theirs), not by path; each format's own fields join only that format's key."""

    NOT_SETTINGS: ClassVar[tuple[str, ...]] = (
        "out", "batch_size", "workers", "mimic", "reports", "ms_cxr", "base_model", "coco", "coco_words",
        "images", "table", "boxes", "shard", "finalize", "dist_timeout",
    )  # fmt: skip
    FORMAT_FIELD: ClassVar[str] = "format"
    FORMAT_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "mimic": ("test_size", "exclude_ms_cxr_patients", "test_no_finding_max", "dicom_contrast", "text_fallback"),
        "coco": ("coco_splits", "coco_val_fraction"),
        "nih": ("test_size", "test_fraction"),
        "openi": ("test_size", "test_fraction", "text_fallback"),
        "csv": ("test_size", "test_fraction"),
    }
    # the input paths each format reads (not settings: their identity joins the key); with FORMAT_FIELDS, what
    # `check_format_options` refuses for any other format
    FORMAT_INPUTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "mimic": ("mimic", "reports", "ms_cxr"),
        "coco": ("coco", "coco_words"),
        "nih": ("images", "table", "boxes"),
        "openi": ("images", "table", "reports"),
        "csv": ("images", "table", "boxes"),
    }

    mimic: Path | None = None
    reports: Path | None = None
    ms_cxr: Path | None = None
    base_model: Path | None = None
    out: Path | None = None
    resolution: Annotated[int | None, Range(ge=1)] = None
    test_size: Annotated[int, Range(ge=1)] = 5000
    seed: Annotated[int, Range(ge=0)] = 0
    batch_size: Annotated[int, Range(ge=1)] = 16
    shard_size: Annotated[int, Range(ge=1)] = 4096
    exclude_ms_cxr_patients: bool = False
    # at most this fraction of the test prompts are "No Finding"
    test_no_finding_max: Annotated[float, Range(ge=0.0, le=1.0)] = 0.1
    # image-decoding processes per accelerate process; None: from the CPU count
    workers: Annotated[int | None, Range(ge=0)] = None
    dicom_contrast: DicomContrast = "mimic-jpg"  # DICOM → 8 bit: MIMIC-CXR-JPG's conversion, or the file's window
    text_fallback: TextFallback = "none"  # none: a report without an IMPRESSION is dropped (the paper's choice)
    # --format coco (cxrdiff.prepare.coco): a COCO-layout root instead of MIMIC-CXR
    format: DataFormat = "mimic"
    coco: Path | None = None  # COCO root: annotations/{captions,instances}_{split}.json and {split}/ images
    coco_splits: str = "train2017,val2017"  # TRAIN,TEST: the official train split (→ train + val) and the test split
    coco_words: Path | None = None  # CSV (category, word): synonyms that also name a category in a test caption
    # share of the train split held out for validation (10,702 of 108,871)
    coco_val_fraction: Annotated[float, Range(ge=0.0, lt=1.0)] = 0.0983
    # --format nih | openi | csv (cxrdiff.prepare.public, docs/public-sets.md)
    images: Path | None = None  # the image folder (NIH's PNGs, Open-i's PNGs, or the root of a CSV's `image` paths)
    table: Path | None = None  # nih: Data_Entry_2017 (default: torchxrayvision's); openi: DICOM metadata; csv: the CSV
    boxes: Path | None = None  # nih: BBox_List_2017 (default: torchxrayvision's); csv: image, phrase, x, y, w, h
    # share of the patients (not boxed) drawn, seeded, for the test set where the table gives no split
    test_fraction: Annotated[float, Range(gt=0.0, lt=1.0)] = 0.2
    shard: str | None = None  # I/N or slurm (cxrdiff.shards): this job's units of the plan
    finalize: bool = False  # only write skipped.csv and the manifest once every shard's units exist
    dist_timeout: Annotated[int, Range(ge=1)] = 1800  # seconds a rank waits for the others in a collective


def check_format_options(config: PrepareConfig) -> None:
    """An option that the chosen format does not read, given a value other than its default, is refused (one
    line naming the option and the formats that read it) rather than silently ignored."""
    chosen = config.format
    readers: dict[str, list[str]] = {}
    for table in (config.FORMAT_FIELDS, config.FORMAT_INPUTS):
        for fmt, names in table.items():
            for name in names:
                readers.setdefault(name, []).append(fmt)
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for name, formats in readers.items():
        if chosen not in formats and getattr(config, name) != defaults[name]:
            flag = "--" + name.replace("_", "-")
            raise InputError(f"{flag} is for --format {' or '.join(dict.fromkeys(formats))}, not --format {chosen}")


def text_fallbacks(choice: str) -> tuple[str, ...]:
    """`--text-fallback` → the parser's fallback sources, in its order ("last-paragraph" → "last_paragraph")."""
    return () if choice == "none" else tuple(part.replace("-", "_") for part in choice.split(","))


def require_flags(config: PrepareConfig, names: tuple[str, ...], fmt: str | None = None) -> None:
    """A one-line error for the first of these options not given (with the `--format` that needs it)."""
    for name in names:
        if getattr(config, name) is None:
            needed = f" with --format {fmt}" if fmt else ""
            raise InputError(f"--{name.replace('_', '-')} is required{needed}")


def input_folder(flag: str, path: str | Path, hint: str = "") -> Path:
    """`path` (given as `--flag`) as a folder; a file or a missing path is a one-line error (`hint` after it)."""
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"--{flag} {folder}: {'a file, not a folder' if folder.exists() else 'no such folder'}{hint}")
    return folder


def check_out(out: Path, wanted: dict[str, Any]) -> None:
    """What `--out` holds, checked before any work (nothing is claimed yet). A folder whose recorded VAE
    fingerprint covers names and sizes only ("sha256:") is named as such rather than as 'other settings' (it
    differs from every fingerprint `vae_fingerprint` makes)."""
    try:
        StepFolder.claim(out, STEP, wanted, create=False)
    except OtherSettings:
        recorded = None
        for name in (MANIFEST, CLAIM):
            try:
                recorded = json.loads((Path(out) / name).read_text()).get("settings", {}).get("vae")
                break
            except (OSError, ValueError, AttributeError):
                continue
        if isinstance(recorded, str) and not fingerprint_covers_weights(recorded):
            raise OtherSettings(
                f"--out {out}: its VAE fingerprint covers file names and sizes, not the VAE's weights; "
                "prepare into a new folder"
            ) from None
        raise
