"""The report's verdicts from the files it measured: a bootstrap of one training each (phrases paired, generated
images against one real set) or Welch's t over trainings, and 'reproduced' only when the interval excludes 0."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrdiff.report.verdicts import grounding_intervals, overall, verdicts

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


@pytest.mark.parametrize(
    ("cnr_shift", "fd_shift", "interpretability", "fidelity", "trade_off"),
    [
        (-0.4, -0.4, "reproduced", "reproduced", "reproduced"),  # learnable grounds worse, draws closer to real
        (0.0, 0.0, "not distinguishable here", "not distinguishable here", "not distinguishable here"),
        (0.4, 0.6, "opposite", "opposite", "opposite"),
    ],
)
def test_one_training_each_is_judged_by_the_bootstrap(tmp_path, cnr_shift, fd_shift, interpretability, fidelity,
                                                        trade_off):  # fmt: skip
    metrics = _one_each(tmp_path, cnr_shift, fd_shift)
    (found,) = verdicts(metrics, tmp_path, seed=0, resamples=400, fd_resamples=100)
    sides = {s["side"]: s for s in found["sides"]}
    assert sides["interpretability"]["verdict"] == interpretability
    assert sides["fidelity"]["verdict"] == fidelity and sides["fidelity"]["metric"] == "FD (x features)"
    assert (
        "paired" in sides["interpretability"]["difference"]["method"]
        and sides["interpretability"]["over"] == "bootstrap"
    )
    assert overall(found["sides"]) == trade_off


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
