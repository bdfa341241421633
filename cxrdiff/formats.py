"""The data format of a prepared folder (MIMIC-CXR, COCO's layout, or a public set in MIMIC's: NIH, Open-i, CSV),
chosen once by `prepare --format` and recorded in its manifest. Every later step reads it once
(`format_record`) and asks the record what it needs to know (its UCG rule, the prompt sources it trains on,
whether its grounding set holds boxes or masks); what a step does per format sits in that step's registry
(prepare's `FORMATS`, ground's `READERS`, report's `REPORTS`), keyed by the format's name. No step compares a
format's name or sniffs columns to guess it.

A new format: `choices.DataFormat` gains a name, `FORMATS` here gains its record, and each step's registry
gains one entry (one new module per step); `tests/test_formats.py` fails while one is missing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Literal, get_args

from cxrdiff.artifacts import MANIFEST
from cxrdiff.choices import DataFormat
from cxrdiff.errors import InputError

DATA_FORMATS: tuple[str, ...] = get_args(DataFormat)
DEFAULT_FORMAT = DATA_FORMATS[0]  # the format of a prepared folder whose manifest names none


@dataclasses.dataclass(frozen=True)
class FormatRecord:
    """What the steps after `prepare` need to know of a data format."""

    name: str
    label: str  # its name in messages
    ucg_field: str = "ucg_no_finding"  # finetune's config field of this format's unconditional-guidance rule
    prompt_sources: tuple[str, ...] | None = None  # the `--prompt-source`s its text allows (None: every one)
    prompt_rule: str = ""  # why the others are refused, for the error message
    regions: Literal["boxes", "masks"] = "boxes"  # what its grounding set scores a map against
    text_column: str = "impression"  # the train shards' text column (COCO: "captions", a list per image)
    labelled: bool = True  # the train shards hold CheXpert's label columns (the UCG rule reads them)

    @property
    def ucg_eligible(self) -> str:
        """Which training rows may get the empty prompt, in the finetune manifest's words."""
        return "samples whose only positive label is No Finding" if self.labelled else "any caption"


FORMATS: dict[str, FormatRecord] = {  # each record states what differs from FormatRecord's defaults (MIMIC's)
    "mimic": FormatRecord(name="mimic", label="MIMIC-CXR"),
    "coco": FormatRecord(
        name="coco",
        label="COCO",
        ucg_field="ucg_caption",
        prompt_sources=("impression",),
        prompt_rule="COCO data trains on its captions (impression)",
        regions="masks",
        text_column="captions",
        labelled=False,
    ),
    # The public sets (docs/public-sets.md), prepared in MIMIC's layout with CheXpert's label columns.
    "nih": FormatRecord(
        name="nih",
        label="NIH ChestX-ray14",
        prompt_sources=("impression",),
        prompt_rule="NIH ChestX-ray14's prepared text is already its labels (the paper's label prompts), "
        "of which CheXpert's columns hold only eight",
    ),
    "openi": FormatRecord(
        name="openi",
        label="Open-i",
        prompt_sources=("impression",),
        prompt_rule="Open-i has no labels: it trains on its impressions",
    ),
    "csv": FormatRecord(name="csv", label="CSV table"),
}


def data_format(prepared: str | os.PathLike | None) -> str:
    """The format recorded by `prepare` in the folder's manifest; the default for a folder that records none
    (or None: no prepared folder, e.g. a single image to ground)."""
    if prepared is None:
        return DEFAULT_FORMAT
    try:
        manifest = json.loads((Path(prepared) / MANIFEST).read_text())
    except (OSError, ValueError):
        return DEFAULT_FORMAT
    return str(manifest.get("format", DEFAULT_FORMAT))


def format_record(prepared: str | os.PathLike | None) -> FormatRecord:
    """The record of the format the folder's manifest names (see `data_format`)."""
    name = data_format(prepared)
    if name not in FORMATS:
        raise InputError(f"{prepared}: format {name!r} in its {MANIFEST} is not one of {', '.join(FORMATS)}")
    return FORMATS[name]
