"""`cxrdiff demo --quick`: the whole chain on phantom data, as a newcomer runs it (slow; runs in CI)."""

import json
import math
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_demo_runs_the_whole_chain_and_reruns_nothing(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "cxrdiff", "demo", "--quick", "--out", str(out)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = out / "report" / "report.html"
    assert result.stdout.strip().splitlines()[-1] == f"report: {report}"
    assert report.is_file() and (out / "report" / "report.md").is_file()

    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert set(metrics["runs"]) == {"Finetune_F", "Finetune_L"}
    for name, run in metrics["runs"].items():
        assert run["training"]["frozen_text"] is (name == "Finetune_F")
        average = run["grounding"]["average"]
        assert average["n"] > 0 and all(math.isfinite(average[k]["mean"]) for k in ("auc_roc", "top1", "cnr"))
        (fidelity,) = run["fidelity"]
        assert fidelity["name"] == "FD (phantom classifier features)"  # never called FID
        assert 0 < run["diversity"]["value"] <= 100
    text = (out / "report" / "report.md").read_text()
    assert "phantom classifier" in text and "FID (" not in text
    assert not re.search(r"\bnan\b", text, re.IGNORECASE), "a NaN reached the report's tables"

    # the manifests chain: finetune records the prepared folder, which records the base model
    frozen = json.loads((out / "frozen" / "manifest.json").read_text())
    assert frozen["inputs"]["data"]["path"] == str((out / "prepared").resolve())

    again = subprocess.run(
        [sys.executable, "-m", "cxrdiff", "--json", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["recomputed"] == {"Finetune_F": "nothing", "Finetune_L": "nothing"}


def test_demo_refuses_another_steps_folder(tmp_path):
    from cxrdiff.artifacts import write_manifest
    from cxrdiff.demo import demo
    from cxrdiff.errors import InputError

    write_manifest(tmp_path, "finetune")
    with pytest.raises(InputError, match="is a 'finetune' folder"):
        demo(tmp_path, quick=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
