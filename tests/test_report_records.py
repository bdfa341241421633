"""The report's typed records (`report.records`): what they read from metrics.json, and that the pages rendered
from them are the pages recorded in tests/data/report (written by the dict-walking renderer they replaced).

A case's files were made by `render` on a metrics dict that the report's end-to-end tests built (tmp paths
replaced by /data/). When a deliberate change of wording moves them, rewrite them with
`CXRDIFF_REGENERATE_REPORTS=1 pytest tests/test_report_records.py` and review the diff.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from cxrdiff.metrics.score import UNTRAINED_LABEL
from cxrdiff.report.records import Measure, read_metrics
from cxrdiff.report.render import render

RECORDED = Path(__file__).parent / "data" / "report"
CASES = sorted(p.name for p in RECORDED.iterdir() if (p / "metrics.json").is_file())
IMAGES = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+")  # PNG bytes depend on the machine's fonts


@pytest.mark.parametrize("case", CASES)
def test_the_report_renders_as_recorded(case, tmp_path):
    folder = RECORDED / case
    metrics = json.loads((folder / "metrics.json").read_text())
    written = [p.name for p in render(metrics, tmp_path)]
    html = IMAGES.sub("data:image/png;base64,…", (tmp_path / "report.html").read_text())
    if os.environ.get("CXRDIFF_REGENERATE_REPORTS"):
        (folder / "report.md").write_text((tmp_path / "report.md").read_text())
        (folder / "report.html").write_text(html)
    assert (tmp_path / "metrics.json").read_bytes() == (folder / "metrics.json").read_bytes()
    assert (tmp_path / "report.md").read_text() == (folder / "report.md").read_text()
    assert html == (folder / "report.html").read_text()
    figures = [n for n in written if n.endswith(".png")]
    assert figures and all(f"{n}" in (tmp_path / "report.md").read_text() for n in figures)


def _run(**extra) -> dict:
    grounding = {
        "average": {"cnr": {"mean": 0.5, "std": 0.1}, "auc_roc": {"mean": 0.8}, "n": 12},
        "classes": {"Edema": {"cnr": {"mean": 0.7}, "n": 3}, "Pneumonia": {}},
        "word_analysis": {"min_count": 2, "top3": {"Edema": [{"word": "edema", "n": 3, "cnr": 0.9}]}},
    }
    intervals = {"average": {"cnr": {"low": 0.4, "high": 0.6}}, "classes": {"Edema": {"cnr": {"low": 0.6}}}}
    return {"grounding": grounding, "grounding_intervals": intervals, **extra}


def test_a_runs_numbers_and_what_was_not_measured():
    fid = {"name": "FID_XRV", "value": 9.5, "interval": {"low": 9.0, "high": 10.0}}
    records = read_metrics({"runs": {"a": _run(fidelity=[fid]), "b": _run(grounding_per_phrase={"average": {}})}})
    a, b = records.runs["a"], records.runs["b"]
    assert a.grounding.average.cnr == Measure(0.5, 0.1, None)
    assert a.grounding.average.top1 is None and a.grounding.average.n == 12
    assert a.grounding.at("Edema").cnr.mean == 0.7 and a.grounding.at("Pneumonia") is None
    assert a.grounding.interval("Average", "cnr") == {"low": 0.4, "high": 0.6}
    assert a.grounding.interval("Edema", "auc_roc") is None
    assert a.grounding.words.top3["Edema"][0].word == "edema" and a.grounding.words.eos_cnr is None
    assert a.first_fidelity.value == 9.5 and a.first_fidelity.title == "FID_XRV"
    assert a.per_phrase is None  # no per-phrase entry: scored as the union
    assert b.fidelity is None and b.first_fidelity is None  # grounded only: never sampled
    assert b.per_phrase is not None and b.per_phrase.average is None
    assert records.groups == {} and records.ddof == 1 and not records.untrained


def test_a_group_reads_its_numbers_over_trainings():
    group = {
        "runs": ["a", "b"],
        "trainings": 2,
        "setting": {"text_encoder": "frozen", "training": "LoRA r16"},
        "grounding": {"average": {"cnr": {"mean": 0.5, "std": 0.2, "n": 2}}},
        "fidelity": {"FID": {"mean": 20.0, "std": 1.0, "n": 2, "title": "FID", "label": None}},
        "diversity": {"mean": None, "std": None, "n": 0},
        "noise_seed_std": {"average": {"cnr": 0.03}},
        "text_source": {"source": "labels", "cnr": {"mean": 0.4, "std": 0.0, "n": 2}, "phrases": 7},
    }
    g = read_metrics({"groups": {"frozen": group}, "trainings": {"ddof": 0}}).groups["frozen"]
    assert (g.runs, g.trainings, g.setting.lora, g.noise_cnr) == (("a", "b"), 2, True, 0.03)
    assert g.grounding.average.cnr == Measure(0.5, 0.2, 2)
    assert g.first_fidelity.name == "FID" and g.first_fidelity.mean == 20.0
    assert g.diversity == Measure(None, None, 0) and g.fidelity_ms_cxr == {}
    assert (g.text_source, g.text_cnr.mean, g.text_phrases) == ("labels", 0.4, 7)
    assert g.eos_cnr is None
    assert read_metrics({"trainings": {"ddof": 0}}).ddof == 0


def test_records_pass_through_and_untrained_scores_are_flagged():
    records = read_metrics({"runs": {"a": _run(fidelity=[{"name": "FD", "value": 1.0, "label": "thumbnails"}])}})
    assert read_metrics(records) is records and not records.untrained
    flagged = {"name": "FD", "value": 1.0, "label": UNTRAINED_LABEL}
    assert read_metrics({"runs": {"a": _run(fidelity=[flagged])}}).untrained
