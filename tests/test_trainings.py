"""Runs grouped by setting (never by folder name) and mean ± std over trainings, on small fake run folders
(manifests and scores, no model), against hand-computed values; and Table 7's subset rule."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from cxrdiff.artifacts import write_manifest
from cxrdiff.errors import InputError
from cxrdiff.report.text_source import label_in_phrase, text_source_cnr, text_source_of
from cxrdiff.report.trainings import TRAININGS_DDOF, group_runs, groups, mean_std, run_setting

SETTINGS = {"data": "d" * 64, "base_model": "b" * 64, "frozen_text": True, "lr": 5e-5, "prompt_source": "impression"}


def _run(folder, seed: int, steps: int = 100, **changes):
    """A finetune folder as far as the report reads it: its manifest (config, settings, steps, weights)."""
    settings = {**SETTINGS, **changes, "seed": seed}
    config = {**settings, "steps": steps, "out": str(folder), "checkpoint_every": 50}
    write_manifest(folder, "finetune", config=config, seed=seed, extra={"settings": settings, "steps": steps})
    return folder


def test_runs_group_by_setting_but_the_seed_never_by_folder_name(tmp_path):
    runs = [
        _run(tmp_path / "learnable", 0),  # a misleading folder name: it is frozen
        _run(tmp_path / "b", 1),
        _run(tmp_path / "c", 2),
        _run(tmp_path / "frozen", 0, frozen_text=False),
        _run(tmp_path / "e", 1, frozen_text=False),
        _run(tmp_path / "f", 0, prompt_source="labels"),  # another text source: its own group
        _run(tmp_path / "g", 0, steps=200),  # trained longer: its own group
        _run(tmp_path / "h", 0, lr=1e-4),  # another learning rate: its own group
    ]
    names = [r.name for r in runs]
    grouped = group_runs(runs, names)
    assert list(grouped.values()) == [["learnable", "b", "c"], ["frozen", "e"], ["f"], ["g"], ["h"]]
    # named in words, as long as needed to tell them apart: never merged because their words agree
    assert list(grouped) == [
        "frozen, 100 steps (setting 1)",
        "learnable",
        "frozen, labels",
        "frozen, 200 steps",
        "frozen, 100 steps (setting 5)",
    ]
    assert "seed" not in run_setting(runs[0]) and run_setting(runs[0]) == run_setting(runs[1])

    named = group_runs(runs, names, labels=(f"Finetune_F={tmp_path / 'c'}", f"Finetune_L={tmp_path / 'e'}"))
    assert named["Finetune_F"] == ["learnable", "b", "c"] and named["Finetune_L"] == ["frozen", "e"]


def test_a_group_whose_members_share_a_seed_or_a_folder_is_refused(tmp_path):
    """One training counted twice would give a zero (or halved) spread and a verdict from it."""
    a, b = _run(tmp_path / "a", 0), _run(tmp_path / "b", 0)
    with pytest.raises(InputError, match=rf"^{b}: shares seed 0 with {a}; trainings of one setting need distinct"):
        group_runs([a, b], ["a", "b"])
    with pytest.raises(InputError, match=rf"^{a}: is given twice"):
        group_runs([a, a], ["x", "y"])
    other = _run(tmp_path / "c", 0, frozen_text=False)  # seed 0 in another setting: fine
    assert group_runs([a, other], ["a", "c"]) == {"frozen": ["a"], "learnable": ["c"]}


def test_labels_are_checked(tmp_path):
    runs = [_run(tmp_path / "a", 0), _run(tmp_path / "b", 1), _run(tmp_path / "c", 0, frozen_text=False)]
    names = ["a", "b", "c"]
    with pytest.raises(InputError, match="expected NAME=DIR"):
        group_runs(runs, names, labels=("Finetune_F",))
    with pytest.raises(InputError, match="is not one of the RUN folders"):
        group_runs(runs, names, labels=(f"F={tmp_path / 'elsewhere'}",))
    with pytest.raises(InputError, match="names the same setting as --label F"):
        group_runs(runs, names, labels=(f"F={tmp_path / 'a'}", f"G={tmp_path / 'b'}"))
    with pytest.raises(InputError, match="never pooled"):
        group_runs(runs, names, labels=(f"F={tmp_path / 'a'}", f"F={tmp_path / 'c'}"))


def _lora_run(folder, seed: int, rank: int, text_rank: int | None = None, **changes):
    """A LoRA fine-tune's folder: the LoRA fields in its settings and its training mode in the manifest, as
    finetune writes them."""
    mode = {"kind": "lora", "rank": rank, "alpha": float(rank), "dropout": 0.0, "targets": ["to_q"],
            "text_rank": text_rank, "text_alpha": None if text_rank is None else float(text_rank)}  # fmt: skip
    settings = {**SETTINGS, **changes, "seed": seed, "lora_rank": rank, "text_lora_rank": text_rank}
    config = {**settings, "steps": 100, "out": str(folder), "lora_rank": rank}
    extra = {"settings": settings, "steps": 100, "training_mode": mode}
    write_manifest(folder, "finetune", config=config, seed=seed, extra=extra)
    return folder


def test_lora_runs_are_their_own_groups_named_by_rank(tmp_path):
    runs = [
        _run(tmp_path / "f0", 0),
        _lora_run(tmp_path / "r16a", 0, 16),
        _run(tmp_path / "f1", 1),
        _lora_run(tmp_path / "r16b", 1, 16),
        _lora_run(tmp_path / "r4", 0, 4),
        _lora_run(tmp_path / "l16", 0, 16, text_rank=16, frozen_text=False),
        _lora_run(tmp_path / "l16t8", 0, 16, text_rank=8, frozen_text=False),
    ]
    grouped = group_runs(runs, [r.name for r in runs])
    assert grouped == {
        "frozen": ["f0", "f1"],  # full fine-tunes keep their name
        "frozen + LoRA r16": ["r16a", "r16b"],
        "frozen + LoRA r4": ["r4"],
        "learnable + LoRA r16": ["l16"],
        "learnable + LoRA r16, text r8": ["l16t8"],
    }
    named = group_runs(runs, [r.name for r in runs], labels=(f"Finetune_F + LoRA r16={tmp_path / 'r16b'}",))
    assert named["Finetune_F + LoRA r16"] == ["r16a", "r16b"]


DIVERSITY_PROTOCOL = {"scales": 3, "kernel_size": 11, "sigma": 1.5, "data_range": 255.0, "prompts": 2}


def _entry(cnr: float, auc: float, fd: float, ms_ssim: float, seed: int, eos: float, subset: float) -> dict:
    cell = {"n": 5, "cnr": {"mean": cnr, "std": 0.02}, "auc_roc": {"mean": auc, "std": 0.0}, "top1": {"mean": 0.5}}
    return {
        "setting": {"text_encoder": "frozen", "prompt_source": "impression", "steps": 100, "seed": seed},
        "grounding": {"classes": {"Edema": cell}, "average": cell, "word_analysis": {"eos_cnr": eos}},
        "fidelity": [{"name": "FD (x features)", "value": fd}],
        "fidelity_ms_cxr": [{"name": "FD (x features)", "value": fd + 1}],
        "diversity": {"name": "MS-SSIM", "value": ms_ssim, "unit": "%", "protocol": DIVERSITY_PROTOCOL},
        "text_source": {"source": "impression", "cnr": subset, "n": 4, "n_all": 5},
        "eos": {"eos_cnr": eos, "class_word_cnr": cnr},
    }


def test_mean_and_std_over_trainings_equal_hand_computed_values():
    runs = {
        "s0": _entry(0.9, 0.80, 10.0, 50.0, 0, 0.70, 1.0),
        "s1": _entry(1.0, 0.82, 12.0, 52.0, 1, 0.74, 1.2),
        "s2": _entry(1.2, 0.84, 17.0, 57.0, 2, 0.78, 1.1),
        "other": _entry(5.0, 0.99, 99.0, 99.0, 0, 9.0, 9.0),  # another setting: must not leak in
    }
    out = groups(runs, {"Finetune_F": ["s0", "s1", "s2"], "other": ["other"]})
    f = out["Finetune_F"]
    assert TRAININGS_DDOF == 1 and f["trainings"] == 3 and f["seeds"] == [0, 1, 2]
    # CNR 0.9, 1.0, 1.2: mean 31/30; squared deviations sum to 0.14/3, over n - 1 = 2
    cnr = f["grounding"]["average"]["cnr"]
    assert cnr["mean"] == pytest.approx(31 / 30) and cnr["std"] == pytest.approx(math.sqrt(0.07 / 3)) and cnr["n"] == 3
    assert f["grounding"]["classes"]["Edema"]["auc_roc"] == pytest.approx({"mean": 0.82, "std": 0.02, "n": 3})
    # FD 10, 12, 17: mean 13, deviations -3, -1, 4 → sum of squares 26, / 2 = 13
    assert f["fidelity"]["FD (x features)"]["mean"] == pytest.approx(13.0)
    assert f["fidelity"]["FD (x features)"]["std"] == pytest.approx(math.sqrt(13.0))
    assert f["fidelity_ms_cxr"]["FD (x features)"]["mean"] == pytest.approx(14.0)
    assert f["diversity"] == pytest.approx({"mean": 53.0, "std": math.sqrt(13.0), "n": 3})
    assert f["eos"]["eos_cnr"] == pytest.approx({"mean": 0.74, "std": 0.04, "n": 3})
    assert f["text_source"]["cnr"] == pytest.approx({"mean": 1.1, "std": 0.1, "n": 3})
    assert f["noise_seed_std"]["average"]["cnr"] == pytest.approx(0.02)  # a separate source, kept apart
    # a group of one: its own numbers, std 0 (no spread measured), never pooled with the others
    assert out["other"]["grounding"]["average"]["cnr"] == {"mean": 5.0, "std": 0.0, "n": 1}
    assert mean_std([1.0, None, float("nan"), 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}


def test_table_7_keeps_only_phrases_that_contain_their_label(tmp_path):
    assert label_in_phrase("Small left Pleural Effusions", "Pleural Effusion")
    assert not label_in_phrase("enlarged cardiac silhouette", "Cardiomegaly")
    assert not label_in_phrase("opacity in the right lung", "Lung Opacity")
    scores = pd.DataFrame(
        {
            "run": [0, 0, 0, 0, 1, 1, 1, 1],
            "category": ["Cardiomegaly", "Cardiomegaly", "Edema", "Pneumothorax"] * 2,
            "phrase": ["cardiomegaly", "enlarged cardiac silhouette", "mild pulmonary edema", "apical PTX"] * 2,
            "cnr": [1.0, -5.0, 2.0, -5.0, 3.0, -5.0, 0.0, -5.0],
        }
    )
    # kept: cardiomegaly (1.0, 3.0) and mild pulmonary edema (2.0, 0.0), in both grounding runs
    assert text_source_cnr(scores) == {"cnr": pytest.approx(1.5), "n": 2, "n_all": 4}
    (tmp_path / "ground").mkdir()
    scores.to_parquet(tmp_path / "ground" / "scores.parquet")
    assert text_source_of(tmp_path / "ground", "labels")["source"] == "labels"
    none = scores[scores["phrase"].isin(["enlarged cardiac silhouette", "apical PTX"])]
    assert text_source_cnr(none) == {"cnr": None, "n": 0, "n_all": 2}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """report.md of two frozen trainings (CNR 0.9 and 1.0, FD 10 and 12) and one learnable labels-trained run."""
    from cxrdiff.report import render

    runs = {
        f"F{i}": _entry(c, 0.8, fd, 50.0, i, 0.7, t) for i, (c, fd, t) in enumerate(((0.9, 10, 1.0), (1.0, 12, 1.2)))
    }
    runs["L-labels"] = _entry(0.3, 0.6, 20.0, 40.0, 0, 0.5, 0.25)
    runs["L-labels"]["setting"] = {"text_encoder": "learnable", "prompt_source": "labels", "steps": 100, "seed": 0}
    members = {"Finetune_F": ["F0", "F1"], "Finetune_L (labels)": ["L-labels"]}
    out = tmp_path_factory.mktemp("rendered")
    render({"runs": runs, "groups": groups(runs, members), "trainings": {"ddof": 1}}, out)
    md = (out / "report.md").read_text()
    return lambda heading: md.split(heading)[1].split("###")[0]


def test_localization_over_trainings_gives_mean_and_sample_std_beside_the_papers(rendered):
    over = rendered("### Localization over trainings")
    assert "Finetune_F (2 trainings) (this report)" in over and "ddof = 1" in over
    assert "80.0 ± 0.0 / 50.0 ± 0.0 / 0.95 ± 0.07" in over  # CNR 0.9, 1.0: std sqrt(0.005)
    assert "86 ± 0.9 / 80 ± 3.3 / 1.25 ± 0.06" in over  # the paper's ± beside


def test_table_4_has_a_row_per_prompt_source_and_the_published_one(rendered):
    table_4 = rendered("### Fidelity and diversity by prompt source")
    assert "| Finetune_F (2 trainings) | MIMIC p19 | this report | — | — | 11.0 ± 1.4 | 50.0 ± 0.0 |" in table_4
    assert "| Finetune_F (2 trainings) | MS-CXR phrases | this report | — | — | 12.0 ± 1.4 | — |" in table_4
    assert "| Finetune_L | MS-CXR phrases | published, Table 4 | 60.5 | 7.3 | — | 11.4 |" in table_4


def test_table_7_sets_each_training_text_beside_the_papers(rendered):
    table_7 = rendered("### CNR by training text (Table 7, measured)")
    assert "| impressions | — | 1.10 ± 0.14 (Finetune_F (2 trainings), 4 phrases) |" in table_7
    assert "| class labels | 0.25 (Finetune_L (labels) (1 training), 4 phrases) | — |" in table_7
    assert "| class labels (published) | 0.29 | 0.8 |" in table_7 and "contain their image's label" in table_7


def test_eos_table_has_a_row_per_group(rendered):
    eos = rendered("### EOS token vs class words")
    assert "| Finetune_F (2 trainings) | frozen | 0.70 ± 0.00 | 0.95 ± 0.07 | 0.72 |" in eos
    assert "| Finetune_L (labels) (1 training) | learnable | 0.50 | 0.30 | — |" in eos  # the paper: impressions


def test_report_groups_fake_trainings_and_never_pools_settings(tmp_path, tiny_model):
    """Through `report` with stand-in steps: three frozen trainings (seeds 0-2) and one learnable run, each
    a copy of the tiny model with a finetune manifest; the stand-in grounding's average CNR is 0.41 + 0.1 × seed."""
    import json
    import shutil

    from test_report import Calls, _grounding, _prepared, _stub_steps

    from cxrdiff.report import ReportConfig, report

    real = _prepared(tmp_path / "prepared")
    runs = []
    for name, seed, frozen in (("a", 0, True), ("b", 1, True), ("c", 2, True), ("d", 0, False)):
        shutil.copytree(tiny_model, tmp_path / name)
        runs.append(_run(tmp_path / name, seed, frozen_text=frozen))
    steps = _stub_steps(Calls())
    ground_fn, ground_config = steps["ground"]

    def ground(cfg):
        result = ground_fn(cfg)
        seed = json.loads((cfg.model / "manifest.json").read_text())["seed"]
        (cfg.out / "summary.json").write_text(json.dumps(_grounding(0.1 * seed)))
        manifest = json.loads((cfg.out / "manifest.json").read_text())  # as if the step had written it so
        manifest["files"]["summary.json"] = (cfg.out / "summary.json").stat().st_size
        (cfg.out / "manifest.json").write_text(json.dumps(manifest))
        return result

    config = ReportConfig(
        runs=tuple(runs),
        out=tmp_path / "report",
        real=real,
        fid=False,
        fid_xrv=False,
        n_fid=4,
        diversity_prompts=2,
        label=(f"Finetune_F={tmp_path / 'b'}",),
    )
    report(config, steps={**steps, "ground": (ground, ground_config)})
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert {g: v["runs"] for g, v in metrics["groups"].items()} == {"Finetune_F": ["a", "b", "c"], "learnable": ["d"]}
    assert metrics["runs"]["c"]["group"] == "Finetune_F" and metrics["trainings"]["ddof"] == 1
    frozen = metrics["groups"]["Finetune_F"]
    assert frozen["seeds"] == [0, 1, 2]
    # CNR 0.41, 0.51, 0.61: mean 0.51, sample std 0.1; AUC 0.61 + 0.1 × seed likewise
    assert frozen["grounding"]["average"]["cnr"] == pytest.approx({"mean": 0.51, "std": 0.1, "n": 3})
    assert frozen["grounding"]["classes"]["Edema"]["auc_roc"] == pytest.approx({"mean": 0.7, "std": 0.1, "n": 3})
    assert metrics["groups"]["learnable"]["grounding"]["average"]["cnr"] == pytest.approx(
        {"mean": 0.41, "std": 0.0, "n": 1}
    )
    assert "Finetune_F (3 trainings)" in (tmp_path / "report" / "report.md").read_text()


def test_runs_of_other_texts_are_grounded_only_unless_asked(tmp_path, tiny_model):
    """A labels run is measured as the paper's Table 7 measures it: grounded, never sampled, and left out of
    the fidelity tables; `other_sources="full"` samples it too."""
    import json
    import shutil

    from test_report import Calls, _prepared, _stub_steps

    from cxrdiff.report import ReportConfig, report

    real = _prepared(tmp_path / "prepared")
    runs = []
    for name, source in (("impr", "impression"), ("lab", "labels")):
        shutil.copytree(tiny_model, tmp_path / name)
        runs.append(_run(tmp_path / name, 0, prompt_source=source))
    calls = Calls()
    steps = _stub_steps(calls)
    sampled: list[str] = []
    sample_fn, sample_config = steps["sample"]

    def sample(cfg):
        sampled.append(cfg.model.name)
        return sample_fn(cfg)

    steps["sample"] = (sample, sample_config)
    base = dict(runs=tuple(runs), real=real, fid=False, fid_xrv=False, n_fid=4, diversity_prompts=2)
    report(ReportConfig(**base, out=tmp_path / "report"), steps=steps)
    assert set(sampled) == {"impr"} and len(calls.ground) == 2
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    labels = metrics["runs"]["lab"]
    assert "fidelity" not in labels and "diversity" not in labels and labels["setting"]["prompt_source"] == "labels"
    assert "skipped" in labels["sampling"] and "fidelity" in metrics["runs"]["impr"]
    page = (tmp_path / "report" / "report.md").read_text()
    table_4 = page.split("## Fidelity and diversity\n")[1].split("\n## ")[0]
    assert "| impr | this report |" in table_4 and "| lab |" not in table_4
    assert "grounded only, as the paper measures them" in page

    sampled.clear()
    report(ReportConfig(**base, out=tmp_path / "full", other_sources="full"), steps=steps)
    assert set(sampled) == {"impr", "lab"}
    assert "fidelity" in json.loads((tmp_path / "full" / "metrics.json").read_text())["runs"]["lab"]
