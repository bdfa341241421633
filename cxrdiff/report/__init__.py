"""`cxrdiff report`: both sides of the trade-off, measured for each run and shown beside the paper's.

`run` orchestrates (make or reuse each run's samples, diversity set and grounding through the steps' own
folders, then measure fidelity), `render` turns the metrics dict into report.md / report.html, and
`published` holds the paper's numbers.
"""

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
from cxrdiff.report.render import Table, grounding_figure, render, tables, tradeoff_figure
from cxrdiff.report.run import (
    STEP,
    Checked,
    ReportConfig,
    check_inputs,
    classifier_key,
    measure_real,
    measure_run,
    report,
)

__all__ = [
    "CLASSIFIER_ORDER",
    "PAPER",
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
