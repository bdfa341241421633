"""`cxrdiff demo --quick --trainings 2`: the whole chain on phantom data, as a newcomer runs it (slow; runs in CI)."""

import json
import math
import re
import subprocess
import sys

import pandas as pd
import pytest

from cxrdiff.data import MS_CXR_CATEGORIES


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
    # Table 5's generated rows: the check's own prompt set, 5 prompts for every class the p19 rows hold (--quick)
    balanced = pd.read_parquet(out / "report" / "classifier-prompts" / "prompts.parquet")
    per_class = balanced["classifier_class"].value_counts().to_dict()
    assert set(per_class.values()) == {5} and "No Finding" in per_class
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
        classes = [c for c in per_class if c != "No Finding"]  # each with 5 positives, so each in the Average
        assert run["classifier"]["Average"]["protocol"] == {
            "classes": len(classes),
            "positives": 5 * len(classes),
            "negatives": 5,
        }
        for cls in MS_CXR_CATEGORIES:
            assert run["classifier"][cls]["protocol"] == {"positives": per_class.get(cls, 0), "negatives": 5}, cls
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

    # every number with its uncertainty, verdicts only where the interval says so (issue: trustworthy verdicts)
    for run in metrics["runs"].values():
        cnr = run["grounding_intervals"]["average"]["cnr"]
        assert cnr["low"] < cnr["value"] < cnr["high"] and "class-stratified" in cnr["method"]
        if "fidelity" in run:
            fd = run["fidelity"][0]["interval"]
            assert fd["low"] < run["fidelity"][0]["value"] < fd["high"]
            assert (
                run["diversity"]["interval"]["low"] <= run["diversity"]["value"] <= run["diversity"]["interval"]["high"]
            )
    (verdict,) = metrics["verdicts"]  # Finetune_F against Finetune_L, two trainings each
    assert [s["side"] for s in verdict["sides"]] == ["interpretability", "fidelity"]
    for side in verdict["sides"]:
        assert side["over"] == "trainings" and side["difference"]["method"].startswith("Welch t over trainings")
        low, high = side["difference"]["low"], side["difference"]["high"]
        if low is None:  # every training gave the same number: no bounds, no verdict
            assert side["verdict"] == "no verdict (no spread observed)"
            continue
        expected = "not distinguishable here" if low <= 0 <= high else None
        assert side["verdict"] == expected or (expected is None and side["verdict"] in ("reproduced", "opposite"))
    headline = text.split("## Headline")[1].split("\n## ")[0]
    assert "a half counts as reproduced or opposite only when its 95% interval over trainings excludes zero" in headline
    assert "± 0.00" not in result.stderr and "verdict: Finetune_F vs Finetune_L" in result.stderr

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


def test_demo_text_encoders_plan_the_bert_pair_beside_clip(tmp_path):
    """`--text-encoders clip,bert`: the BERT pair (frozen, learnable) from the first base model, conditioned
    through `finetune --text-encoder`, beside the CLIP runs; an unknown encoder is refused before any work."""
    from cxrdiff.demo import DemoPlan, demo, planned_runs
    from cxrdiff.errors import InputError

    bases = {"pretrained": tmp_path / "base-model-pretrained"}
    runs, jobs = planned_runs(tmp_path, tmp_path / "prepared", bases, ("pretrained",), 1, DemoPlan.quick(),
                               bert=tmp_path / "tiny-bert")  # fmt: skip
    assert list(runs) == ["Finetune_F", "Finetune_L", "Finetune_F (BERT)", "Finetune_L (BERT)"]
    by_out = {job.out.name: job for job in jobs}
    assert (
        by_out["bert-frozen-seed0"].text_encoder == tmp_path / "tiny-bert" and by_out["bert-frozen-seed0"].frozen_text
    )
    assert not by_out["bert-learnable-seed0"].frozen_text and by_out["pretrained-frozen-seed0"].text_encoder is None
    assert {job.base_model for job in jobs} == {bases["pretrained"]}
    with pytest.raises(InputError, match="--text-encoders clip,gpt: expected some of clip, bert"):
        demo(tmp_path / "demo", quick=True, text_encoders=("clip", "gpt"))
    assert not (tmp_path / "demo").exists()


def test_demo_lora_adds_lora_runs_and_leaves_the_default_plan_alone(tmp_path):
    from cxrdiff.demo import DemoPlan, planned_runs

    base = {"pretrained": tmp_path / "base"}
    runs, jobs = planned_runs(tmp_path, tmp_path / "prepared", base, ("pretrained",), 2, DemoPlan.quick())
    assert list(runs) == ["Finetune_F", "Finetune_L", "Finetune_F (labels)", "Finetune_L (labels)"]
    assert all(job.lora_rank is None for job in jobs)
    with_lora, lora_jobs = planned_runs(
        tmp_path, tmp_path / "prepared", base, ("pretrained",), 2, DemoPlan.quick(), lora=True
    )
    assert lora_jobs[: len(jobs)] == jobs  # the full fine-tunes are the default demo's, untouched
    assert list(with_lora) == [
        "Finetune_F", "Finetune_L", "Finetune_F + LoRA r16", "Finetune_L + LoRA r16",
        "Finetune_F (labels)", "Finetune_L (labels)",
    ]  # fmt: skip
    lora = [job for job in lora_jobs if job.lora_rank is not None]
    assert [(j.out.name, j.frozen_text, j.lora_rank, j.seed) for j in lora] == [
        ("pretrained-frozen-lora16-seed0", True, 16, 0),
        ("pretrained-frozen-lora16-seed1", True, 16, 1),
        ("pretrained-learnable-lora16-seed0", False, 16, 0),
        ("pretrained-learnable-lora16-seed1", False, 16, 1),
    ]
    assert all(j.lr == DemoPlan.quick().lr and j.steps == DemoPlan.quick().finetune_steps for j in lora)
