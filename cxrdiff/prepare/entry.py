"""The `cxrdiff prepare` step: hand the config to the reader of its data format (`--format`), which checks the
inputs, claims `--out` and writes the prepared units. The format is chosen here once and recorded in the
manifest (`formats.data_format` reads it back for every later step). A new format is one new module beside
`mimic` and `coco` and one entry in `FORMATS`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from cxrdiff.config import check_ranges
from cxrdiff.prepare.coco import check_coco_inputs, prepare_coco
from cxrdiff.prepare.config import PrepareConfig
from cxrdiff.prepare.mimic import check_mimic_inputs, prepare_mimic


class Format(NamedTuple):
    """One data format's reader: its input check (claims nothing yet) and its step."""

    check_inputs: Callable[[PrepareConfig], Any]
    prepare: Callable[[PrepareConfig], dict[str, Any]]


FORMATS: dict[str, Format] = {
    "mimic": Format(check_mimic_inputs, prepare_mimic),
    "coco": Format(check_coco_inputs, prepare_coco),
}


def check_inputs(config: PrepareConfig) -> Any:
    """Every structural fault of the inputs, before any image, report or weight is read."""
    check_ranges(config)
    return FORMATS[config.format].check_inputs(config)


def prepare(config: PrepareConfig) -> dict[str, Any]:
    """Run the step (or resume it); return the counts and paths."""
    check_ranges(config)
    return FORMATS[config.format].prepare(config)
