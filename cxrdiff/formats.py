"""The data format of a prepared folder (MIMIC-CXR or COCO's layout), chosen once by `prepare --format` and
recorded in its manifest; every later step asks `data_format` and hands over to its own module for that
format, so no step sniffs columns or files to guess it.

A new format: `DataFormat` gains a name, and each step that reads data gains one module for it (a phantom
writer, a prepare reader, a report), registered in that step's table of formats.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import get_args

from cxrdiff.artifacts import MANIFEST
from cxrdiff.choices import DataFormat

DATA_FORMATS: tuple[str, ...] = get_args(DataFormat)
DEFAULT_FORMAT = DATA_FORMATS[0]  # folders made before formats were recorded are MIMIC ones


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
