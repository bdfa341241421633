"""Grounding laterality: the side a phrase names, the map's share on that side of the patient (the patient's
left is the image's right), and a model's summary with its interval, against hand-computed values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrdiff.metrics.laterality import MIN_SIDED, laterality, laterality_intervals, named_side


@pytest.mark.parametrize(
    ("phrase", "side"),
    [
        ("Small left pleural effusion.", "left"),
        ("right lower lobe airspace disease", "right"),
        ("Right-sided pneumothorax", "right"),
        ("bilateral pleural effusions", "bilateral"),
        ("bibasilar atelectasis", "bilateral"),
        ("opacities in both lungs", "bilateral"),
        ("left and right basilar opacity", "bilateral"),
        ("Moderate cardiomegaly", ""),
        ("leftover contrast", ""),  # a word match, not a substring
        ("upright film, cardiomegaly", ""),
    ],
)
def test_named_side_is_a_word_match(phrase, side):
    assert named_side(phrase) == side


def test_all_mass_on_the_image_right_is_the_patients_left():
    heat = np.zeros((8, 8))
    heat[:, 4:] = 1.0  # the image's right half
    assert laterality(heat, "left") == 1.0  # "left effusion": all on the patient's left
    assert laterality(heat, "right") == 0.0


def test_laterality_by_hand():
    heat = np.zeros((4, 4))
    heat[0, 0] = 3.0  # image left (patient's right)
    heat[2, 3] = 1.0  # image right (patient's left)
    assert laterality(heat, "right") == pytest.approx(0.75)
    assert laterality(heat, "left") == pytest.approx(0.25)
    odd = np.zeros((2, 5))
    odd[:, 2] = 2.0  # the middle column of an odd width: half on each side
    odd[0, 4] = 1.0
    assert laterality(odd, "left") == pytest.approx((2.0 + 1.0) / 5.0)  # (4 × 0.5 + 1) / 5
    assert laterality(np.zeros((4, 4)), "left") == 0.5  # a constant map, normalised to zeros: no preference
    with pytest.raises(ValueError, match="side must be"):
        laterality(heat, "bilateral")


def _scores(lateralities, runs=1, boxes=1):
    rows = []
    for run in range(runs):
        for i, value in enumerate(lateralities):
            for box in range(boxes):
                rows.append({"run": run, "sample": f"{i:06d}", "side": "left", "laterality": value + 0.1 * run,
                             "box": box})  # fmt: skip
    rows.append({"run": 0, "sample": "999998", "side": "bilateral", "laterality": np.nan, "box": 0})
    rows.append({"run": 0, "sample": "999999", "side": "", "laterality": np.nan, "box": 0})
    return pd.DataFrame(rows)


def test_a_models_summary_averages_runs_counts_boxes_once_and_excludes_bilateral():
    values = [0.2, 0.4, 0.6, 0.8, 0.9, 0.3, 0.7, 0.55, 0.4, 1.0]
    result = laterality_intervals(_scores(values, runs=2, boxes=2), seed=0, resamples=200)
    assert result["n"] == 10 and not result["too_few"]
    assert result["counts"] == {"left": 10, "right": 0, "bilateral": 1, "none": 1}
    expected = float(np.mean(values)) + 0.05  # runs 0 and 1 differ by 0.1: their mean is 0.05 up
    assert result["mean"]["value"] == pytest.approx(expected)
    assert result["mean"]["low"] < expected < result["mean"]["high"]
    on_side = np.mean([v + 0.05 > 0.5 for v in values])  # 0.4 + 0.05 is below: 6 of 10 above
    assert result["on_named_side"]["value"] == pytest.approx(on_side) == 0.6


def test_fewer_than_ten_sided_phrases_are_too_few_and_old_folders_say_unmeasured():
    result = laterality_intervals(_scores([0.9] * (MIN_SIDED - 1)), seed=0)
    assert result["too_few"] and result["n"] == MIN_SIDED - 1 and "mean" not in result
    old = _scores([0.9]).drop(columns=["side", "laterality"])
    assert laterality_intervals(old, seed=0)["measured"] is False
