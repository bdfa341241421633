"""The report's laterality table: per run, how much of a sided phrase's attention falls on the side of the
patient it names (`metrics.laterality`), with its bootstrap interval over the phrases, beside the run's CNR."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cxrdiff.metrics.intervals import RESAMPLES
from cxrdiff.metrics.laterality import laterality_intervals
from cxrdiff.report.document import Table
from cxrdiff.report.page import interval_text
from cxrdiff.report.records import RunResult
from cxrdiff.report.steps import read_table


def measure_laterality(ground_dir: Path, seed: int, resamples: int = RESAMPLES) -> dict[str, Any]:
    """A run's metrics.json `laterality` entry, from its ground folder's scores.parquet."""
    if not (ground_dir / "scores.parquet").is_file():
        return {"measured": False, "reason": "no scores.parquet in the ground folder"}
    return laterality_intervals(read_table(ground_dir / "scores.parquet"), seed, resamples)


def _cell(interval: Mapping[str, Any] | None, scale: float = 1.0, digits: int = 2) -> str:
    if not interval:
        return "—"
    return f"{interval['value'] * scale:.{digits}f}" + interval_text(interval, digits, scale)


def laterality_table(runs: Mapping[str, RunResult]) -> Table | None:
    """One row per run with a `laterality` entry; None when no run has one (metrics.json without laterality)."""
    rows = []
    for name, run in runs.items():
        found = run.laterality
        if not found:
            continue
        cnr = run.grounding.interval("Average", "cnr")
        if not found.get("measured"):
            rows.append([name, "not measured", "—", "—", _cell(cnr)])
            continue
        counts = found.get("counts") or {}
        left, right, both = (counts.get(k, 0) for k in ("left", "right", "bilateral"))
        sided = f"{found['n']} ({left} left, {right} right; {both} bilateral excluded)"
        if found.get("too_few"):
            rows.append([name, sided, f"too few ({found['n']})", f"too few ({found['n']})", _cell(cnr)])
            continue
        rows.append([name, sided, _cell(found.get("mean")), _cell(found.get("on_named_side"), 100, 1), _cell(cnr)])
    if not rows:
        return None
    return Table(
        "Localization: laterality (attention on the side of the patient the phrase names)",
        ["run", "phrases naming one side", "laterality", "on the named side %", "CNR (average)"],
        rows,
        "Laterality: over the phrases naming one side (left or right; bilateral ones excluded), the share of the "
        "phrase's normalised map on the named side of the image midline, the patient's left being the image's right; "
        "0.5 is no preference, 1 all on the named side. On the named side: the phrases whose share is above 0.5. "
        '[ ] a 95% bootstrap interval over the phrases; fewer than 10 sided phrases show "too few (n)". '
        'Not measured by the paper (docs/method.md, "Laterality").',
    )
