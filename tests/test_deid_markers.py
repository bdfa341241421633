"""`finetune --deid-markers keep|strip`: how MIMIC's "___" de-identification markers reach the training text, and
that the default joins no settings key (run folders made before the option keep theirs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures_prepared import build_prepared

from cxrdiff.data import LABELS
from cxrdiff.errors import InputError
from cxrdiff.finetune import FinetuneConfig, TrainingText, finetune, run_settings
from cxrdiff.finetune.data import strip_deid_markers


@pytest.mark.parametrize(
    ("text", "stripped"),
    [
        ("Compared to ___, no change.", "Compared to, no change."),
        ("Findings discussed with Dr. ___ by ___ at ___ on ___.", "Findings discussed with Dr. by at on."),
        ("Chest radiograph from ___.", "Chest radiograph from."),
        ("___-year-old man with cough", "-year-old man with cough"),
        ("a ___ ___ b", "a b"),
        ("___.", ""),  # nothing but the marker: the empty prompt
        ("No acute process.", "No acute process."),
    ],
)
def test_strip_deid_markers(text, stripped):
    assert strip_deid_markers(text) == stripped


def test_training_text_strips_only_when_asked():
    impressions = ["Compared to ___, mild edema.", "___."]
    labels = np.full((2, len(LABELS)), np.nan, np.float32)
    labels[0, LABELS.index("Edema")] = labels[1, LABELS.index("No Finding")] = 1.0
    rng = np.random.default_rng(0)
    keep = TrainingText("impression", impressions, labels, 0.0)
    strip = TrainingText("impression", impressions, labels, 0.0, deid_markers="strip")
    assert [keep.text(i, rng) for i in range(2)] == impressions
    assert [strip.text(i, rng) for i in range(2)] == ["Compared to, mild edema.", ""]
    with pytest.raises(InputError, match="--deid-markers 'drop': expected keep or strip"):
        TrainingText("impression", impressions, labels, 0.0, deid_markers="drop")


def test_keep_joins_no_settings_key_and_strip_is_another_run(tmp_path, tiny_model):

    data = build_prepared(tmp_path / "prepared", n=4, model=tiny_model)
    base = dict(data=data, base_model=tiny_model, frozen_text=True, steps=1, batch_size=2, log_every=1)
    keep = FinetuneConfig(out=tmp_path / "run", **base)
    assert "deid_markers" not in run_settings(keep)
    assert run_settings(FinetuneConfig(out=tmp_path / "run", deid_markers="strip", **base))["deid_markers"] == "strip"
    finetune(keep)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert "deid_markers" not in manifest["settings"] and manifest["config"]["deid_markers"] == "keep"
    with pytest.raises(InputError, match="deid_markers"):  # the same folder with stripped text: another run
        finetune(FinetuneConfig(out=tmp_path / "run", deid_markers="strip", **base))
    with pytest.raises(InputError, match="--deid-markers 'drop': expected keep or strip"):
        finetune(FinetuneConfig(out=tmp_path / "other", deid_markers="drop", **base))
    assert not (tmp_path / "other").exists()
