"""`cxrdiff demo --quick --trainings 2`: the whole chain on phantom data, as a newcomer runs it (slow; runs in CI)."""

import json
import math
import re
import subprocess
import sys

import pandas as pd
import pytest


@pytest.mark.slow
def test_quick_demo_runs_the_whole_chain_and_reruns_nothing(tmp_path):
    """`demo --quick --trainings 2`: two trainings per model (seeds 0 and 1) and a labels-trained run per
    model, so the report has ± over trainings, both Table 4 columns, Table 7 measured and the EOS row."""
    out = tmp_path / "demo"
    argv = [sys.executable, "-m", "cxrdiff", "demo", "--quick", "--trainings", "2", "--out", str(out)]
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = out / "report" / "report.html"
    assert result.stdout.strip().splitlines()[-1] == f"report: {report}"
    assert report.is_file() and (out / "report" / "report.md").is_file()

    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert len(metrics["runs"]) == 6
    held_out = len(pd.read_parquet(out / "prepared" / "test.parquet"))  # every p19 row calibrates the copy rate
    for name, run in metrics["runs"].items():
        assert run["training"]["frozen_text"] is name.startswith("Finetune_F")
        average = run["grounding"]["average"]
        assert average["n"] > 0 and all(math.isfinite(average[k]["mean"]) for k in ("auc_roc", "top1", "cnr"))
        if name.endswith("(labels)"):  # Table 7 runs are grounded only, as the paper measures them
            assert "fidelity" not in run and "checkpoints" not in run
            continue
        (fidelity,) = run["fidelity"]
        assert fidelity["name"] == "FD (phantom classifier features)"  # never called FID
        assert 0 < run["diversity"]["value"] <= 100 and 0 < run["diversity_ms_cxr"]["value"] <= 100
        assert run["fidelity_ms_cxr"][0]["name"] == fidelity["name"]
        assert [p["step"] for p in run["checkpoints"]] == [30, 60]  # the curve over training
        # today's benchmarks and the privacy section, on the phantom classifier's features
        assert run["benchmark"]["networks"][0]["network"] == "phantom classifier features"
        copies = run["privacy"]["copy_rate"]
        assert copies["measure"] == "cosine on phantom classifier features" and 0 <= copies["rate"] <= 1
        assert run["privacy"]["copy_rate_pixels"]["held_out_images"] == held_out and run["privacy"]["pairs"]["pixels"]
        assert run["privacy"]["memorization"]["training"]["n"] == 4
        assert all(p["copy_rate"]["n"] == held_out for p in run["checkpoints"])  # the privacy side of the curve
    groups = metrics["groups"]
    assert set(groups) == {"Finetune_F", "Finetune_L", "Finetune_F (labels)", "Finetune_L (labels)"}
    for name in ("Finetune_F", "Finetune_L"):
        assert groups[name]["trainings"] == 2 and groups[name]["seeds"] == [0, 1]
        cnr = groups[name]["grounding"]["average"]["cnr"]
        assert cnr["n"] == 2 and math.isfinite(cnr["std"])
        assert groups[name]["text_source"]["source"] == "impression"
        assert groups[f"{name} (labels)"]["text_source"]["source"] == "labels"
        for group in (groups[name], groups[f"{name} (labels)"]):
            assert math.isfinite(group["text_source"]["cnr"]["mean"]) and group["text_source"]["phrases"] > 0
            assert math.isfinite(group["eos"]["eos_cnr"]["mean"])
    text = (out / "report" / "report.md").read_text()
    assert "phantom classifier" in text and "FID (" not in text
    assert not re.search(r"\bnan\b", text, re.IGNORECASE), "a NaN reached the report's tables"
    over = text.split("### Localization over trainings")[1].split("###")[0]
    assert "Finetune_F (2 trainings)" in over and " ± " in over.split("Finetune_F (2 trainings)")[1]
    table_4 = text.split("### Fidelity and diversity by prompt source")[1].split("###")[0]
    assert "| MIMIC p19 | this report |" in table_4 and "| MS-CXR phrases | this report |" in table_4
    table_7 = text.split("### CNR by training text (Table 7, measured)")[1].split("###")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in table_7.splitlines() if line.startswith("| ")}
    assert "(Finetune_F (2 trainings)" in rows["impressions"] and "(Finetune_L (labels)" in rows["class labels"]
    privacy = text.split("## Privacy: does the model copy its training images?")[1].split("\n## ")[0]
    assert "![privacy-pairs](privacy-pairs.png)" in privacy and "### Privacy over training" in privacy
    assert "### Fidelity on feature networks" in text and (out / "report" / "privacy-pairs.png").is_file()
    eos = text.split("### EOS token vs class words")[1].split("###")[0]
    assert "| Finetune_F (2 trainings) | frozen |" in eos and "| 0.72 |" in eos

    # the manifests chain: finetune records the prepared folder, which records the base model
    frozen = json.loads((out / "runs" / "pretrained-frozen-seed0" / "manifest.json").read_text())
    assert frozen["inputs"]["data"]["path"] == str((out / "prepared").resolve())

    again = subprocess.run(
        [sys.executable, "-m", "cxrdiff", "--json", *argv[3:]],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    recomputed = json.loads(again.stdout)["recomputed"]
    assert set(recomputed) == set(metrics["runs"])
    assert all(re.fullmatch(r"nothing(; checkpoints: nothing)?", done) for done in recomputed.values()), recomputed


def test_demo_refuses_another_steps_folder(tmp_path):
    from cxrdiff.artifacts import write_manifest
    from cxrdiff.demo import demo
    from cxrdiff.errors import InputError

    write_manifest(tmp_path, "finetune")
    with pytest.raises(InputError, match="is a 'finetune' folder"):
        demo(tmp_path, quick=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
