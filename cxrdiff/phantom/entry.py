"""The `cxrdiff phantom` step: check the numbers, claim `--out`, and hand over to the writer of the kind asked
for (a MIMIC-CXR-shaped tree, `tree`; a COCO-layout set, `coco`). A new kind is one new writer module and one
entry in `WRITERS`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cxrdiff.artifacts import StepFolder
from cxrdiff.phantom import coco, tree
from cxrdiff.phantom.config import PhantomConfig, check_numbers, claim

WRITERS: dict[str, Callable[[PhantomConfig, StepFolder], dict[str, Any]]] = {
    "mimic": tree.write_mimic_tree,
    "coco": coco.write_coco_set,
}


def check_inputs(config: PhantomConfig) -> StepFolder:
    """Refuse bad numbers and an `--out` that is not this phantom's folder, before anything is drawn."""
    check_numbers(config)
    return claim(config)


def make_phantom(config: PhantomConfig) -> dict[str, Any]:
    """Write the phantom to `config.out`; return its paths and counts.

    A re-run with the same settings into a finished folder returns at once; into a folder a killed run
    left behind, it keeps the images already written (they are the same bytes) and writes the rest.
    """
    folder = check_inputs(config)
    return WRITERS[config.kind](config, folder)
