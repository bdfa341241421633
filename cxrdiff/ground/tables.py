"""The step's outputs from its rows: the conventions the summary records, the per-class and average tables
(mean ± std over runs), Table 6's word analysis, and what `ground` returns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.artifacts import atomic_path
from cxrdiff.ground.config import GroundConfig
from cxrdiff.ground.tokens import SPECIAL


def conventions(config: GroundConfig, frame_size: int) -> dict[str, Any]:
    """How the maps were made and scored, as summary.json records them."""
    return {
        "cnr": config.cnr,
        "boxes": config.boxes,
        "frame": config.frame,
        "frame_size": frame_size if config.frame == "prepared" else "original image size",
        "map": "softmax over tokens, mean over heads, nearest to the latent grid, mean over layers and the "
        f"last {config.window} of {config.steps} DDIM steps; min-max normalised, bilinear to the frame",
        "mode": config.mode,
        "guidance": config.guidance,
        "latent": "VAE posterior mean"
        if config.latent == "mean"
        else "a VAE posterior sample, seeded per sample and run",
        "boxes_rule": BOX_RULES[config.boxes],
        "seeds": [config.seed + r for r in range(config.noise_seeds)],
    }


BOX_RULES = {
    "union": "each phrase against the union of all boxes of its image and class (the paper's Table 1)",
    "per-phrase": "each phrase against the union of its own boxes (the paper's phrase grounding, Table 3)",
    "per-box": "each box of a phrase scored on its own",
}
SCORE_COLUMNS = [
    "run",
    "sample",
    "dicom_id",
    "category",
    "phrase",
    "tokens",
    "token_text",
    "token_source",
    "box",
    "auc_roc",
    "top1",
    "cnr",
    "side",
    "laterality",
]
METRICS = ("auc_roc", "top1", "cnr")


def write_parquet(frame: Any, path: Path) -> None:
    """A table written whole or not at all."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value) of the runs' values."""
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if array.size > 1 else 0.0}


def tables(scores: Any, runs: int) -> dict[str, Any]:
    """Per-class means and the average over samples, each as mean ± std over runs."""
    if scores.empty:
        return {"classes": {}, "average": None}
    per_run = [scores[scores["run"] == r] for r in range(runs)]
    classes = {}
    for category in sorted(scores["category"].unique()):
        runs_cat = [s[s["category"] == category] for s in per_run]
        classes[category] = {
            "n": int(len(runs_cat[0])),
            **{m: mean_std([float(s[m].mean()) for s in runs_cat]) for m in METRICS},
        }
    average = {"n": int(len(per_run[0])), **{m: mean_std([float(s[m].mean()) for s in per_run]) for m in METRICS}}
    return {"classes": classes, "average": average}


def laterality_summary(scores: Any, runs: int) -> dict[str, Any]:
    """summary.json's laterality: the phrases by the side they name, and over the sided ones (each counted once
    per run, whatever its boxes) the mean laterality and the share on the named side, mean ± std over runs."""
    from cxrdiff.metrics.laterality import LATERALITY_RULE, SIDES, side_counts

    result: dict[str, Any] = {"rule": LATERALITY_RULE, "counts": side_counts(scores) if len(scores) else {}}
    sided = scores[scores["side"].isin(SIDES)].drop_duplicates(["run", "sample"])
    result["n"] = int(sided["sample"].nunique())
    if not result["n"]:
        return {**result, "mean": None, "on_named_side": None}
    per_run = [sided[sided["run"] == r]["laterality"] for r in range(runs)]
    result["mean"] = mean_std([float(v.mean()) for v in per_run])
    result["on_named_side"] = mean_std([float((v > 0.5).mean()) for v in per_run])
    return result


def word_analysis(words: Any, min_count: int) -> dict[str, Any]:
    """Table 6, counted as the paper did: within each class, the words (case kept; start and end tokens
    included) that occur in more than `min_count` of that class's phrases (the first run's); for each, the
    mean CNR (over all runs) when its first token is the map; the top 3 per class. `n` is the word's count
    in the class. `class_words`: the ranked words that contain one of the class's words, whatever their rank.
    `eos_cnr` is the end token's mean CNR over all classes (the paper quotes it)."""
    result: dict[str, Any] = {"min_count": min_count, "counting": "per class, case kept", "counts": {}, "top3": {}}
    if not len(words):
        return result
    first_run = words[words["run"] == words["run"].min()]
    counts = first_run.groupby(["category", "word"])["sample"].nunique()
    means = words.groupby(["category", "word"])["cnr"].mean()
    for category in sorted(counts.index.get_level_values(0).unique()):
        frequent = {w: int(n) for w, n in counts[category].items() if n > min_count}
        result["counts"][category] = dict(sorted(frequent.items(), key=lambda item: (-item[1], item[0])))
        ranked = sorted(frequent, key=lambda w: (-float(means[(category, w)]), w))[:3]
        result["top3"][category] = [{"word": w, "cnr": float(means[(category, w)]), "n": frequent[w]} for w in ranked]
    from cxrdiff.data import CLASS_WORDS

    result["class_words"] = {  # the class's own words (e.g. "cardiomegaly", "cardiac") among the ranked ones
        category: [
            {"word": w, "cnr": float(means[(category, w)]), "n": n}
            for w, n in frequent.items()
            if any(k in w.lower() for k in CLASS_WORDS.get(category, ()))
        ]
        for category, frequent in result["counts"].items()
    }
    eos = words[words["word"] == SPECIAL[1]]["cnr"]
    result["eos_cnr"] = float(eos.mean()) if len(eos) else None
    return result


def read_summary(out: Path) -> dict[str, Any]:
    """The summary.json of a finished ground folder."""
    return json.loads((out / "summary.json").read_text())


def step_result(out: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """What `ground` returns (and the CLI prints): the averages and where the outputs are."""
    result: dict[str, Any] = {"out": str(out), "samples": summary.get("samples")}
    average = summary.get("average")
    if average:
        for m in METRICS:
            result[m] = round(average[m]["mean"], 4)
            result[f"{m}_std"] = round(average[m]["std"], 4)
    laterality = summary.get("laterality")
    if isinstance(laterality, dict) and laterality.get("mean"):
        result["laterality"] = round(laterality["mean"]["mean"], 4)
        result["laterality_phrases"] = laterality["n"]
    result["heatmaps"] = str(out / "heatmaps.npz")
    if (out / "scores.parquet").is_file():
        result["scores"] = str(out / "scores.parquet")
    return result
