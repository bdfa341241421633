"""The report's verdicts from the files it measured: Welch's t over 2+ trainings per model, 'reproduced' only when
the interval excludes 0; with one training, this training's bootstrap (phrases or images, paired) and no verdict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrdiff.errors import InputError
from cxrdiff.metrics.intervals import Interval
from cxrdiff.report.page import side_line
from cxrdiff.report.verdicts import grounding_intervals, overall, trade_off_words, verdicts

CLASSES = ("Edema", "Pneumonia", "Cardiomegaly")


def _ground(out: Path, name: str, cnr: np.ndarray) -> None:
    """A run's ground/scores.parquet: one row per phrase, two noise seeds (runs) that average to `cnr`."""
    folder = out / "runs" / name / "ground"
    folder.mkdir(parents=True)
    n = len(cnr)
    rows = []
    for run, shift in ((0, -0.05), (1, 0.05)):
        rows += [{"run": run, "sample": f"{i:06d}", "category": CLASSES[i % 3], "box": None, "cnr": cnr[i] + shift,
                  "auc_roc": 0.7, "top1": 1.0} for i in range(n)]  # fmt: skip
    pd.DataFrame(rows).to_parquet(folder / "scores.parquet")


def _features(out: Path, name: str, real: np.ndarray, fake: np.ndarray) -> None:
    folder = out / "runs" / name / "features"
    folder.mkdir(parents=True)
    np.savez(folder / "fd-x-features.npz", real=real, fake=fake)


def _entry(frozen: bool, cnr: float, fd: float, base: str = "/b") -> dict:
    return {
        "training": {"frozen_text": frozen},
        "setting": {"base_model": base, "prompt_source": "impression"},
        "grounding": {"average": {"cnr": {"mean": cnr}}},
        "fidelity": [{"name": "FD (x features)", "value": fd}],
        "n_generated": 120,
    }


def _one_each(tmp_path: Path, learnable_cnr_shift: float, learnable_fd_shift: float) -> dict:
    rng = np.random.default_rng(0)
    cnr = rng.normal(0.6, 0.3, 60)
    learnable = cnr + learnable_cnr_shift + rng.normal(0, 0.05, 60)
    _ground(tmp_path, "frozen", cnr)
    _ground(tmp_path, "learnable", learnable)
    real = rng.normal(size=(120, 8))
    _features(tmp_path, "frozen", real, rng.normal(size=(120, 8)) + 0.4)
    _features(tmp_path, "learnable", real, rng.normal(size=(120, 8)) + 0.4 + learnable_fd_shift)
    runs = {"frozen": _entry(True, float(cnr.mean()), 1.0), "learnable": _entry(False, float(learnable.mean()), 1.0)}
    return {"runs": runs}


def test_grounding_interval_is_the_stratified_bootstrap_of_the_phrases(tmp_path):
    cnr = np.linspace(0.0, 1.2, 30)
    _ground(tmp_path, "r", cnr)
    found = grounding_intervals(tmp_path / "runs" / "r" / "ground", seed=0, resamples=500)
    average = found["average"]["cnr"]
    assert average["value"] == pytest.approx(cnr.mean())  # the noise seeds averaged per phrase first
    assert average["low"] < cnr.mean() < average["high"] and "class-stratified" in average["method"]
    half = 1.96 * cnr.std(ddof=1) / np.sqrt(30)  # stratification only narrows it
    assert average["high"] - average["low"] < 2 * half * 1.1
    assert found["classes"]["Edema"]["cnr"]["value"] == pytest.approx(cnr[0::3].mean())


VERDICT_WORDS = ("reproduced", "opposite", "better")


@pytest.mark.parametrize(("cnr_shift", "fd_shift"), [(-0.4, -0.4), (0.0, 0.0), (0.4, 0.6)])
def test_one_training_each_shows_this_trainings_interval_and_no_verdict(tmp_path, cnr_shift, fd_shift):
    metrics = _one_each(tmp_path, cnr_shift, fd_shift)
    (found,) = verdicts(metrics, tmp_path, seed=0, resamples=400, fd_resamples=100)
    sides = {s["side"]: s for s in found["sides"]}
    interp, fid = sides["interpretability"], sides["fidelity"]
    for side in (interp, fid):  # the interval is still there, over this training's phrases or images ...
        assert side["over"] == "bootstrap" and side["difference"]["low"] is not None
        assert side["verdict"] == "no verdict (one training per model; a verdict needs 2+ trainings per model)"
    assert "paired" in interp["difference"]["method"] and fid["metric"] == "FD (x features)"
    assert "paired" in fid["difference"]["method"] and fid["images"] == [120, 120]
    if cnr_shift:  # ... and excludes zero where the runs differ, yet no verdict word anywhere
        assert Interval.from_dict(interp["difference"]).excludes_zero()
    said = overall(found["sides"])
    assert said == found["overall"] == interp["verdict"]
    text = " ".join([*(side_line(s) for s in found["sides"]), trade_off_words(found)]).lower()
    assert not any(word in text for word in VERDICT_WORDS), text
    assert "this training's phrases" in text and "2+ trainings per model" in text
    assert "on 5,000 images, lower is closer; here 120 images each" in side_line(fid)  # n beside the paper's n


def test_unequal_trainings_compare_and_print_the_same_two_runs(tmp_path):
    """3 frozen trainings against 1 learnable: the bootstrap compares frozen's first run with the learnable one,
    so the numbers printed beside it are those two runs', not the mean over three; and no verdict."""
    rng = np.random.default_rng(1)
    frozen_cnr = rng.normal(0.9, 0.05, 60)
    _ground(tmp_path, "f0", frozen_cnr)
    _ground(tmp_path, "l0", frozen_cnr - 0.3)
    runs = {"f0": _entry(True, float(frozen_cnr.mean()), 1.0), "f1": _entry(True, 0.3, 1.0),
            "f2": _entry(True, 0.3, 1.0), "l0": _entry(False, float(frozen_cnr.mean()) - 0.3, 1.0)}  # fmt: skip
    groups = {
        "F": {"runs": ["f0", "f1", "f2"], "setting": {"text_encoder": "frozen", "base_model": "/b"}},
        "L": {"runs": ["l0"], "setting": {"text_encoder": "learnable", "base_model": "/b"}},
    }
    (found,) = verdicts({"runs": runs, "groups": groups}, tmp_path, seed=0, resamples=400)
    (interp,) = found["sides"]
    assert interp["compared"] == ["f0", "l0"] and interp["trainings"] == [3, 1]
    assert interp["frozen"] - interp["learnable"] == pytest.approx(interp["difference"]["value"]) == pytest.approx(0.3)
    assert interp["verdict"].startswith("no verdict (unequal trainings (3 vs 1)")
    assert "reproduced" not in side_line(interp) + trade_off_words(found)


def test_zero_spread_over_trainings_gives_no_bounds_and_no_verdict(tmp_path):
    runs = {f"f{s}": _entry(True, 0.5, 10.0) for s in range(2)} | {f"l{s}": _entry(False, 0.3, 10.0) for s in range(2)}
    groups = {
        "F": {"runs": ["f0", "f1"], "setting": {"text_encoder": "frozen", "base_model": "/b"}},
        "L": {"runs": ["l0", "l1"], "setting": {"text_encoder": "learnable", "base_model": "/b"}},
    }
    (found,) = verdicts({"runs": runs, "groups": groups}, tmp_path, seed=0)
    interp = found["sides"][0]
    assert interp["difference"]["low"] is None and interp["difference"]["reason"] == "no spread observed"
    assert interp["verdict"] == "no verdict (no spread observed)" and interp["p_value"] is None
    assert found["overall"].startswith("no verdict")


def _side(verdict: str, p: float | None) -> dict:
    return {"side": "interpretability", "verdict": verdict, "p_value": p}


def test_a_claim_on_one_half_passes_holm_over_the_halves_shown():
    # one half at p = 0.04 alone is no claim on "one of the two halves": Holm tests the smaller p at 0.025
    assert overall([_side("reproduced", 0.04), _side("not distinguishable here", 0.5)]) == "not distinguishable here"
    assert overall([_side("reproduced", 0.01), _side("not distinguishable here", 0.5)]).startswith("partly reproduced")
    assert overall([_side("opposite", 0.02), _side("not distinguishable here", 0.3)]).startswith("partly opposite")
    assert overall([_side("reproduced", 0.04), _side("reproduced", 0.045)]) == "reproduced"  # both: no correction
    assert overall([_side("reproduced", 0.04)]).startswith("partly reproduced")  # one half shown: nothing to adjust


def test_not_distinguishable_prints_the_trainings_that_would_decide_it(tmp_path):
    """The README's demo: CNR frozen − learnable −0.30 with spreads 0.17 and 0.19 over 3 trainings each."""
    frozen, learnable = np.array([-0.17, 0.0, 0.17]) + 0.52, np.array([-0.19, 0.0, 0.19]) + 0.82
    runs = {f"f{s}": _entry(True, v, 10.0) for s, v in enumerate(frozen)}
    runs |= {f"l{s}": _entry(False, v, 10.0 + s) for s, v in enumerate(learnable)}  # FD frozen 10.0: no spread
    groups = {
        "F": {"runs": ["f0", "f1", "f2"], "setting": {"text_encoder": "frozen", "base_model": "/b"}},
        "L": {"runs": ["l0", "l1", "l2"], "setting": {"text_encoder": "learnable", "base_model": "/b"}},
    }
    (found,) = verdicts({"runs": runs, "groups": groups}, tmp_path, seed=0)
    interp = found["sides"][0]
    assert interp["verdict"] == "not distinguishable here"
    assert interp["spread"] == pytest.approx([0.17, 0.19]) and interp["power"]["difference"] == pytest.approx(-0.30)
    # 400,000 simulated Welch tests give 27.0 % at 3 v 3 and 80.6 % first at 7 v 7 (6 v 6: 72.2 %)
    assert interp["power"]["at_3"] == pytest.approx(0.270, abs=0.01) and interp["power"]["needed"] == 7
    line = side_line(interp)
    assert "7 trainings per model would detect it with 80% power" in line and "3 trainings each have 27%" in line


def test_small_classes_show_too_few_instead_of_an_interval(tmp_path):
    cnr = np.linspace(0.0, 1.2, 27)  # 9 phrases per class
    _ground(tmp_path, "r", cnr)
    found = grounding_intervals(tmp_path / "runs" / "r" / "ground", seed=0, resamples=500)
    edema = Interval.from_dict(found["classes"]["Edema"]["cnr"])
    assert not edema.has_bounds and edema.reason == "too few (9)" and edema.value == pytest.approx(cnr[0::3].mean())
    assert Interval.from_dict(found["average"]["cnr"]).has_bounds  # the average rests on all 27


def test_a_non_finite_cnr_is_refused_not_dropped(tmp_path):
    metrics = _one_each(tmp_path, -0.4, 0.0)
    scores = tmp_path / "runs" / "learnable" / "ground" / "scores.parquet"
    frame = pd.read_parquet(scores)
    frame.loc[frame["sample"] == "000004", "cnr"] = np.nan
    frame.to_parquet(scores)
    with pytest.raises(InputError, match=r"learnable/ground/scores.parquet: 1 phrases have a non-finite CNR"):
        verdicts(metrics, tmp_path, seed=0, resamples=200, fd_resamples=10)


def test_two_trainings_each_use_welch(tmp_path):
    runs = {f"f{s}": _entry(True, 0.60 + 0.01 * s, 10.0 + s) for s in range(3)}
    runs |= {f"l{s}": _entry(False, 0.20 + 0.01 * s, 8.0 - s) for s in range(3)}
    groups = {
        "F": {"runs": ["f0", "f1", "f2"], "setting": {"text_encoder": "frozen", "base_model": "/b"}},
        "L": {"runs": ["l0", "l1", "l2"], "setting": {"text_encoder": "learnable", "base_model": "/b"}},
    }
    (found,) = verdicts({"runs": runs, "groups": groups}, tmp_path, seed=0)
    interp, fid = found["sides"]
    assert interp["over"] == "trainings" and interp["difference"]["value"] == pytest.approx(0.40)
    assert interp["verdict"] == "reproduced" and interp["difference"]["method"].startswith("Welch")
    # FD learnable − frozen = 7 − 11 = −4 with spread 1 on each side: Welch's interval excludes zero
    assert fid["difference"]["value"] == pytest.approx(-4.0) and fid["verdict"] == "reproduced"


def test_the_demo_summary_with_one_training_has_no_verdict_word(tmp_path):
    """`cxrdiff demo` prints this summary: from one training each, with runs that differ beyond their phrases'
    noise (it printed "interpretability opposite"), it shows the difference and says no verdict."""
    import json

    from cxrdiff.demo import _summary

    metrics = _one_each(tmp_path, 0.4, 0.6)
    metrics["verdicts"] = verdicts(metrics, tmp_path, seed=0, resamples=400, fd_resamples=100)
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(metrics))
    summary = _summary(path)
    said = summary["verdict: frozen vs learnable"]
    text = json.dumps(summary).lower()
    assert not any(word in text for word in VERDICT_WORDS), text
    diff = Interval.from_dict(metrics["verdicts"][0]["sides"][0]["difference"])
    assert diff.excludes_zero() and said["interpretability"] == (
        "no verdict (one training per model; a verdict needs 2+ trainings per model): CNR difference "
        f"{diff.text(2)} over this training's phrases"
    )
    assert said["trade-off"].startswith("no verdict") and "over this training's generated images" in said["fidelity"]


def test_holm_runs_over_every_half_of_every_base_model(tmp_path):
    """--text-init both: two base models, four halves shown; a one-half claim must pass Holm over all four."""
    from scipy import stats

    from cxrdiff.metrics.intervals import holm

    frozen_cnr = {"/a": [0.60, 0.66, 0.72], "/b": [0.60, 0.62, 0.64]}
    learnable_cnr = {"/a": [0.40, 0.52, 0.48], "/b": [0.50, 0.70, 0.55]}
    runs, groups = {}, {}
    for base in ("/a", "/b"):
        for kind, cnrs in (("frozen", frozen_cnr[base]), ("learnable", learnable_cnr[base])):
            names = [f"{base}{kind}{s}" for s in range(3)]
            runs |= {
                n: _entry(kind == "frozen", c, 10.0 + 0.3 * s, base)
                for s, (n, c) in enumerate(zip(names, cnrs, strict=True))
            }
            groups[f"{base}{kind}"] = {"runs": names, "setting": {"text_encoder": kind, "base_model": base}}
    found = verdicts({"runs": runs, "groups": groups}, tmp_path, seed=0)
    sides = [s for v in found for s in v["sides"]]
    p_values = [s["p_value"] for s in sides]
    assert p_values[0] == pytest.approx(stats.ttest_ind(frozen_cnr["/a"], learnable_cnr["/a"], equal_var=False).pvalue)
    assert [s["p_holm"] for s in sides] == pytest.approx(holm(p_values))
    first = found[0]
    assert first["sides"][0]["verdict"] == "reproduced" and 0.0125 < p_values[0] < 0.05  # alone: p < 0.05 ...
    assert first["overall"] == "not distinguishable here"  # ... but not after Holm over the four halves
