"""The `cxrdiff report` step: find the prepared folder the runs are measured against, and hand over to the report
of its data format (`formats.data_format`): MIMIC-CXR's tables (`orchestrate`) or COCO's Table 2 (`coco`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cxrdiff.config import check_ranges
from cxrdiff.formats import data_format
from cxrdiff.report.coco import report_coco
from cxrdiff.report.config import ReportConfig, Steps
from cxrdiff.report.jobs import emit_jobs
from cxrdiff.report.orchestrate import real_folder, report_mimic
from cxrdiff.report.steps import recorded_real

REPORTS: dict[str, Callable[[ReportConfig, Any, Steps | None], dict[str, Any]]] = {
    "mimic": report_mimic,
    "coco": report_coco,
    **{name: report_mimic for name in ("nih", "openi", "csv")},  # the public sets are prepared in MIMIC's layout
}


def report(config: ReportConfig, classifier: Any = None, steps: Steps | None = None) -> dict[str, Any]:
    """Run what is missing for each run, measure, and write metrics.json, report.md, report.html.

    `classifier`: an object with name, classes, scores(images) [and features(x), cache_key], used instead
    of torchxrayvision's. `steps` maps "sample" / "ground" to (function, config class); by default
    `cxrdiff.sample` and `cxrdiff.ground` (tests pass stand-ins).
    """
    check_ranges(config)
    if config.emit_jobs is not None:
        return emit_jobs(config, Path(config.emit_jobs), real_folder(config))
    real = recorded_real(config)
    return REPORTS[data_format(real)](config, classifier, steps)
