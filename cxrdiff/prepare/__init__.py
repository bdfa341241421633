"""`cxrdiff prepare`: a data set (MIMIC-CXR + reports + MS-CXR, or a COCO-layout set) → latent Parquet units.

Reads top-down: `entry` hands the config to the data format's module (`mimic`, `coco`), each of which checks
its inputs, plans its units and encodes them with the one shared encoder (`encode`) in its own `Layout`;
`config` holds what the step is asked for.
"""

from cxrdiff.prepare.config import STEP, PrepareConfig, text_fallbacks
from cxrdiff.prepare.encode import SKIPPED_COLUMNS, STATE
from cxrdiff.prepare.entry import FORMATS, check_inputs, prepare
from cxrdiff.prepare.mimic import build_plan, prepare_settings

__all__ = [
    "FORMATS",
    "SKIPPED_COLUMNS",
    "STATE",
    "STEP",
    "PrepareConfig",
    "build_plan",
    "check_inputs",
    "prepare",
    "prepare_settings",
    "text_fallbacks",
]
