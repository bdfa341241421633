"""`cxrdiff demo --quick --trainings 2`: the whole chain on phantom data, as a newcomer runs it (slow; runs in CI)."""

import json
import math
import re
import subprocess
import sys

import pandas as pd
import pytest

from cxrdiff.data import MS_CXR_CATEGORIES


class Demo:
    """One `demo --quick --trainings 2` (two trainings per model, seeds 0 and 1, and a labels-trained run per
    model), read back: its output, metrics.json and report.md."""

    def __init__(self, out):
        self.out = out
        self.argv = [sys.executable, "-m", "cxrdiff", "demo", "--quick", "--trainings", "2", "--out", str(out)]
        self.result = subprocess.run(self.argv, capture_output=True, text=True)
        assert self.result.returncode == 0, self.result.stderr[-3000:]
        self.metrics = json.loads((out / "report" / "metrics.json").read_text())
        self.text = (out / "report" / "report.md").read_text()

    def section(self, heading: str, end: str = "###") -> str:
        return self.text.split(heading)[1].split(end)[0]

    def sampled_runs(self) -> dict:
        """The runs trained on impressions (the labels-trained ones are grounded only)."""
        return {name: run for name, run in self.metrics["runs"].items() if not name.endswith("(labels)")}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return Demo(tmp_path_factory.mktemp("demo") / "demo")


@pytest.mark.slow
def test_demo_prints_the_report_it_wrote(demo):
    report = demo.out / "report" / "report.html"
    assert demo.result.stdout.strip().splitlines()[-1] == f"report: {report}"
    assert report.is_file() and (demo.out / "report" / "report.md").is_file()


@pytest.mark.slow
def test_every_run_is_grounded_with_finite_scores(demo):
    assert len(demo.metrics["runs"]) == 6
    for name, run in demo.metrics["runs"].items():
        assert run["training"]["frozen_text"] is name.startswith("Finetune_F"), name
        average = run["grounding"]["average"]
        assert average["n"] > 0 and all(math.isfinite(average[k]["mean"]) for k in ("auc_roc", "top1", "cnr")), name


@pytest.mark.slow
def test_labels_runs_are_grounded_only(demo):
    """Table 7's runs are grounded only, as the paper measures them."""
    labels = {name: run for name, run in demo.metrics["runs"].items() if name.endswith("(labels)")}
    assert len(labels) == 2
    assert all("fidelity" not in run and "checkpoints" not in run for run in labels.values())


@pytest.mark.slow
def test_fidelity_is_a_distance_on_the_phantom_classifier_never_called_fid(demo):
    for name, run in demo.sampled_runs().items():
        (fidelity,) = run["fidelity"]
        assert fidelity["name"] == "FD (phantom classifier features)", name
        assert run["fidelity_ms_cxr"][0]["name"] == fidelity["name"], name
    assert "phantom classifier" in demo.text and "FID (" not in demo.text


@pytest.mark.slow
def test_diversity_is_a_percentage(demo):
    for name, run in demo.sampled_runs().items():
        assert 0 < run["diversity"]["value"] <= 100 and 0 < run["diversity_ms_cxr"]["value"] <= 100, name


@pytest.mark.slow
def test_each_run_has_its_curve_over_training(demo):
    for name, run in demo.sampled_runs().items():
        assert [p["step"] for p in run["checkpoints"]] == [30, 60], name


@pytest.mark.slow
def test_privacy_is_measured_on_every_held_out_image(demo):
    held_out = len(pd.read_parquet(demo.out / "prepared" / "test.parquet"))  # every p19 row calibrates the copy rate
    for name, run in demo.sampled_runs().items():
        assert run["benchmark"]["networks"][0]["network"] == "phantom classifier features", name
        copies = run["privacy"]["copy_rate"]
        assert copies["measure"] == "cosine on phantom classifier features" and 0 <= copies["rate"] <= 1, name
        assert run["privacy"]["copy_rate_pixels"]["held_out_images"] == held_out and run["privacy"]["pairs"]["pixels"]
        assert run["privacy"]["memorization"]["training"]["n"] == 4, name
        assert all(p["copy_rate"]["n"] == held_out for p in run["checkpoints"]), name  # the curve's privacy side


@pytest.mark.slow
def test_table_5_rests_on_five_prompts_per_class(demo):
    """Table 5's generated rows: the check's own prompt set, 5 prompts for every class the p19 rows hold
    (--quick), counts read from metrics.json."""
    balanced = pd.read_parquet(demo.out / "report" / "classifier-prompts" / "prompts.parquet")
    per_class = balanced["classifier_class"].value_counts().to_dict()
    assert set(per_class.values()) == {5} and "No Finding" in per_class
    classes = [c for c in per_class if c != "No Finding"]  # each with 5 positives, so each in the Average
    for name, run in demo.sampled_runs().items():
        average = {"classes": len(classes), "positives": 5 * len(classes), "negatives": 5}
        assert run["classifier"]["Average"]["protocol"] == average, name
        for cls in MS_CXR_CATEGORIES:
            assert run["classifier"][cls]["protocol"] == {"positives": per_class.get(cls, 0), "negatives": 5}, cls


@pytest.mark.slow
def test_groups_hold_two_trainings_each_and_their_text_source(demo):
    groups = demo.metrics["groups"]
    assert set(groups) == {"Finetune_F", "Finetune_L", "Finetune_F (labels)", "Finetune_L (labels)"}
    for name in ("Finetune_F", "Finetune_L"):
        assert groups[name]["trainings"] == 2 and groups[name]["seeds"] == [0, 1], name
        cnr = groups[name]["grounding"]["average"]["cnr"]
        assert cnr["n"] == 2 and math.isfinite(cnr["std"]), name
        assert groups[name]["text_source"]["source"] == "impression"
        assert groups[f"{name} (labels)"]["text_source"]["source"] == "labels"


@pytest.mark.slow
def test_text_source_and_eos_cnr_are_measured_for_every_group(demo):
    for name, group in demo.metrics["groups"].items():
        assert math.isfinite(group["text_source"]["cnr"]["mean"]) and group["text_source"]["phrases"] > 0, name
        assert math.isfinite(group["eos"]["eos_cnr"]["mean"]), name


@pytest.mark.slow
def test_no_nan_reaches_the_report(demo):
    assert not re.search(r"\bnan\b", demo.text, re.IGNORECASE)


@pytest.mark.slow
def test_localization_over_trainings_shows_a_spread(demo):
    over = demo.section("### Localization over trainings")
    assert "Finetune_F (2 trainings)" in over and " ± " in over.split("Finetune_F (2 trainings)")[1]


@pytest.mark.slow
def test_table_4_has_both_prompt_sources(demo):
    rows = _rows(demo.section("### Fidelity and diversity by prompt source"))
    assert _has_cells(rows, "MIMIC p19", "this report") and _has_cells(rows, "MS-CXR phrases", "this report")


@pytest.mark.slow
def test_table_7_names_the_group_of_each_training_text(demo):
    rows = {r[0]: r for r in _rows(demo.section("### CNR by training text (Table 7, measured)"))}
    assert "(Finetune_F (2 trainings)" in " ".join(rows["impressions"])
    assert "(Finetune_L (labels)" in " ".join(rows["class labels"])


@pytest.mark.slow
def test_privacy_section_has_its_figure_and_its_curve(demo):
    privacy = demo.section("## Privacy: does the model copy its training images?", "\n## ")
    assert "![privacy-pairs](privacy-pairs.png)" in privacy and "### Privacy over training" in privacy
    assert "### Fidelity on feature networks" in demo.text and (demo.out / "report" / "privacy-pairs.png").is_file()


@pytest.mark.slow
def test_eos_table_sets_the_papers_value_beside_ours(demo):
    rows = _rows(demo.section("### EOS token vs class words"))
    assert _has_cells(rows, "Finetune_F (2 trainings)", "frozen") and _has_cells(rows, "0.72")


@pytest.mark.slow
def test_every_number_carries_an_interval_around_it(demo):
    for name, run in demo.metrics["runs"].items():
        cnr = run["grounding_intervals"]["average"]["cnr"]
        assert cnr["low"] < cnr["value"] < cnr["high"] and "class-stratified" in cnr["method"], name
    for name, run in demo.sampled_runs().items():
        fd = run["fidelity"][0]
        assert fd["interval"]["low"] < fd["value"] < fd["interval"]["high"], name
        diversity = run["diversity"]
        assert diversity["interval"]["low"] <= diversity["value"] <= diversity["interval"]["high"], name


@pytest.mark.slow
def test_a_verdict_only_where_the_interval_over_trainings_excludes_zero(demo):
    (verdict,) = demo.metrics["verdicts"]  # Finetune_F against Finetune_L, two trainings each
    assert [s["side"] for s in verdict["sides"]] == ["interpretability", "fidelity"]
    for side in verdict["sides"]:
        assert side["over"] == "trainings" and side["difference"]["method"].startswith("Welch t over trainings")
        low, high = side["difference"]["low"], side["difference"]["high"]
        if low is None:  # every training gave the same number: no bounds, no verdict
            assert side["verdict"] == "no verdict (no spread observed)", side
            continue
        allowed = {"not distinguishable here"} if low <= 0 <= high else {"reproduced", "opposite"}
        assert side["verdict"] in allowed, side
    assert "± 0.00" not in demo.result.stderr and "verdict: Finetune_F vs Finetune_L" in demo.result.stderr


@pytest.mark.slow
def test_the_headline_states_when_a_half_counts(demo):
    assert "only when its 95% interval over trainings excludes zero" in demo.section("## Headline", "\n## ")


@pytest.mark.slow
def test_the_manifests_chain_finetune_to_its_prepared_folder(demo):
    frozen = json.loads((demo.out / "runs" / "pretrained-frozen-seed0" / "manifest.json").read_text())
    assert frozen["inputs"]["data"]["path"] == str((demo.out / "prepared").resolve())


@pytest.mark.slow
def test_a_second_demo_recomputes_nothing(demo):
    again = subprocess.run([sys.executable, "-m", "cxrdiff", "--json", *demo.argv[3:]], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    recomputed = json.loads(again.stdout)["recomputed"]
    assert set(recomputed) == set(demo.metrics["runs"])
    assert all(re.fullmatch(r"nothing(; checkpoints: nothing)?", done) for done in recomputed.values()), recomputed


def _rows(table: str) -> list[list[str]]:
    """A markdown table's rows (header and rule included) as lists of cell texts."""
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in table.splitlines()
        if line.startswith("| ")
    ]


def _has_cells(rows: list[list[str]], *cells: str) -> bool:
    """Whether a row holds `cells` side by side."""
    n = len(cells)
    return any(tuple(row[i : i + n]) == cells for row in rows for i in range(len(row) - n + 1))
