"""Grounding laterality: does a phrase's attention fall on the side of the patient the phrase names?

A radiograph shows the patient's left on the image's right, in PA and AP views alike. A phrase names a side
when its words include "left" or "right" and not both; "bilateral", "bilaterally", "both", "bibasilar" and
"bibasal" (or both side words) make it bilateral, which is excluded and counted. Its laterality is the share
of the min-max normalised map's mass on the named side of the image's vertical midline: 1 all on the named
side, 0 all on the other, 0.5 no preference (a constant map, whose normalised mass is zero, counts 0.5).
A phrase is "on the named side" when its laterality is above 0.5. Definition in docs/method.md.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from cxrdiff.metrics.intervals import RESAMPLES, bootstrap_mean

SIDES = ("left", "right")
BILATERAL_WORDS = frozenset({"bilateral", "bilaterally", "both", "bibasilar", "bibasal"})
LATERALITY_RULE = (
    "phrases naming one side (left or right, word match; bilateral, both, bibasilar or both sides: excluded and "
    "counted): the share of the min-max normalised map's mass on the named side of the image midline, the "
    "patient's left on the image's right (0.5: no preference); on_named_side: the share of phrases above 0.5"
)
MIN_SIDED = 10  # a model with fewer sided phrases shows "too few (n)", never a number
NO_SIDE, BILATERAL = "", "bilateral"


def named_side(phrase: str) -> str:
    """ "left" or "right" when the phrase names exactly one side of the patient; "bilateral" when it names
    both (or says bilateral); "" when it names none."""
    words = set(re.findall(r"[a-z]+", phrase.lower()))
    named = [s for s in SIDES if s in words]
    if words & BILATERAL_WORDS or len(named) == 2:
        return BILATERAL
    return named[0] if named else NO_SIDE


def laterality(frame_map: np.ndarray, side: str) -> float:
    """Share of the map's mass (H, W; non-negative, e.g. min-max normalised) on the named side of the image's
    vertical midline; the patient's left is the image's right. A column the midline cuts (odd width) counts
    half on each side. A map without mass has no preference: 0.5."""
    if side not in SIDES:
        raise ValueError(f"laterality: side must be one of {SIDES}, got {side!r}")
    columns = np.asarray(frame_map, dtype=np.float64).sum(axis=0)  # (W,)
    total = float(columns.sum())
    if total <= 0.0:
        return 0.5
    width = columns.shape[0]
    right_share = np.clip(np.arange(1, width + 1) - width / 2.0, 0.0, 1.0)  # each column's area right of the midline
    on_image_right = float((columns * right_share).sum()) / total
    return on_image_right if side == "left" else 1.0 - on_image_right


def per_phrase(scores: Any) -> Any:
    """One row per sided phrase (sample) with its laterality averaged over the runs, from score rows holding
    `sample`, `side` and `laterality` (per-box rows repeat a phrase's value; they count once)."""
    sided = scores[scores["side"].isin(SIDES)].drop_duplicates(["run", "sample"])
    return sided.groupby("sample", sort=True).agg(side=("side", "first"), laterality=("laterality", "mean"))


def side_counts(scores: Any) -> dict[str, int]:
    """Phrases (samples) by the side they name: left, right, bilateral (excluded) and none."""
    first = scores.drop_duplicates("sample")
    named = first["side"].fillna(NO_SIDE)
    return {
        "left": int((named == "left").sum()),
        "right": int((named == "right").sum()),
        "bilateral": int((named == BILATERAL).sum()),
        "none": int((named == NO_SIDE).sum()),
    }


def laterality_intervals(scores: Any, seed: int, resamples: int = RESAMPLES) -> dict[str, Any]:
    """A model's laterality over its sided phrases: the mean and the share on the named side, each with a
    bootstrap 95% interval over the phrases, and the side counts; `too_few` below MIN_SIDED phrases."""
    if "side" not in scores or "laterality" not in scores:
        return {"measured": False, "reason": "the ground folder records no sides (grounded before laterality)"}
    phrases = per_phrase(scores)
    values = phrases["laterality"].to_numpy(dtype=np.float64)
    result: dict[str, Any] = {"measured": True, "n": len(values), "counts": side_counts(scores)}
    result["too_few"] = len(values) < MIN_SIDED
    if result["too_few"]:
        return result
    result["mean"] = bootstrap_mean(values, None, resamples, seed=seed, over="phrases").as_dict()
    on_side = (values > 0.5).astype(np.float64)
    result["on_named_side"] = bootstrap_mean(on_side, None, resamples, seed=seed, over="phrases").as_dict()
    return result
