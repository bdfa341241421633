"""The `cxrdiff prepare` step: hand the config to the reader of its data format (`--format`), which checks the
inputs, claims `--out` and writes the prepared units. The format is chosen here once and recorded in the
manifest (`formats.data_format` reads it back for every later step). A new format is one new module beside
`mimic` and `coco` and one entry in `FORMATS`; the public sets (`nih`, `openi`, `csv`) share `public`."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

from cxrdiff.config import check_ranges
from cxrdiff.prepare.coco import check_coco_inputs, prepare_coco
from cxrdiff.prepare.config import PrepareConfig, check_format_options
from cxrdiff.prepare.csv import CSV
from cxrdiff.prepare.mimic import check_mimic_inputs, prepare_mimic
from cxrdiff.prepare.nih import NIH
from cxrdiff.prepare.openi import OPENI
from cxrdiff.prepare.public import check_public_inputs, prepare_public


class Format(NamedTuple):
    """One data format's reader: its input check (claims nothing yet) and its step."""

    check_inputs: Callable[[PrepareConfig], Any]
    prepare: Callable[[PrepareConfig], dict[str, Any]]


PUBLIC = (NIH, OPENI, CSV)
FORMATS: dict[str, Format] = {
    "mimic": Format(check_mimic_inputs, prepare_mimic),
    "coco": Format(check_coco_inputs, prepare_coco),
    **{fmt.name: Format(partial(check_public_inputs, fmt=fmt), partial(prepare_public, fmt=fmt)) for fmt in PUBLIC},
}


def check_inputs(config: PrepareConfig) -> Any:
    """Every structural fault of the inputs, before any image, report or weight is read."""
    check_ranges(config)
    check_format_options(config)
    return FORMATS[config.format].check_inputs(config)


def prepare(config: PrepareConfig) -> dict[str, Any]:
    """Run the step (or resume it); return the counts and paths."""
    check_ranges(config)
    check_format_options(config)
    return FORMATS[config.format].prepare(config)
