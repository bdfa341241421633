"""`cxrdiff report`: both sides of the trade-off, measured for each run and shown beside the paper's.

Reads top-down: `entry` hands over by the data format of the prepared folder; `orchestrate` (MIMIC-CXR:
Tables 1, 3–7) and `coco` (Table 2) make or reuse each run's step folders (`steps`), measure them (`measure`,
`checkpoints` for the curves over training), and write the page: `render` (the paper's tables and the
figures) and `page` (headline, verdicts, settings) through `document` (one writer for Markdown and HTML).
`config` holds what the step is asked for; `published` the paper's numbers.
"""

from cxrdiff.report.config import STEP, ReportConfig
from cxrdiff.report.document import Page, Table
from cxrdiff.report.entry import report
from cxrdiff.report.measure import classifier_key, measure_real, measure_run
from cxrdiff.report.orchestrate import Checked, check_inputs
from cxrdiff.report.published import (
    CLASSIFIER_ORDER,
    PAPER,
    PROTOCOL,
    PUBLISHED_CLASSIFIER,
    PUBLISHED_CNR_METHODS,
    PUBLISHED_FIDELITY,
    PUBLISHED_LOCALIZATION,
    PUBLISHED_TEXT_SOURCE,
)
from cxrdiff.report.render import grounding_figure, render, tables, tradeoff_figure

__all__ = [
    "CLASSIFIER_ORDER",
    "PAPER",
    "Page",
    "PROTOCOL",
    "PUBLISHED_CLASSIFIER",
    "PUBLISHED_CNR_METHODS",
    "PUBLISHED_FIDELITY",
    "PUBLISHED_LOCALIZATION",
    "PUBLISHED_TEXT_SOURCE",
    "STEP",
    "Checked",
    "ReportConfig",
    "Table",
    "check_inputs",
    "classifier_key",
    "grounding_figure",
    "measure_real",
    "measure_run",
    "render",
    "report",
    "tables",
    "tradeoff_figure",
]
