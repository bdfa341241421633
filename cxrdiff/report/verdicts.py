"""Intervals for what a report measured, and the differences its verdicts are judged on.

Localization: a bootstrap over the MS-CXR phrases of one run (class-stratified, so every class keeps its
count and the sample-weighted average keeps its weights), on the per-phrase scores the ground step wrote.

A verdict compares the frozen and the learnable model fine-tuned from the same base, side by side on both
halves of the trade-off, and says "reproduced" or "opposite" only when the difference's interval excludes
zero; otherwise "not distinguishable here" (`metrics.intervals.verdict`). The interval is over trainings
when both models have two or more (Welch's t on the runs' values: the spread the paper's ± describes), else a
bootstrap of one run each: over the phrases, paired (the same phrases grounded by both), for CNR; over the
generated images of each, for the Fréchet distance (the features `measure` kept, one real set for both).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.metrics.intervals import (
    FRECHET_RESAMPLES,
    RESAMPLES,
    Interval,
    bootstrap_difference,
    bootstrap_mean,
    frechet_difference,
    trainings_difference,
    verdict,
)
from cxrdiff.report.measure import features_file
from cxrdiff.report.steps import read_table

GROUND_METRICS = ("auc_roc", "top1", "cnr")
ITEM = ["sample", "box", "category"]  # one scored phrase (or box, with --boxes per-box); runs averaged


def phrase_scores(ground_dir: Path) -> Any:
    """One row per scored phrase (averaged over the ground step's noise seeds), from scores.parquet."""
    scores = read_table(ground_dir / "scores.parquet")
    scores = scores.assign(box=scores["box"].astype(str) if "box" in scores else "None")
    return scores.groupby(ITEM, sort=True, dropna=False)[list(GROUND_METRICS)].mean().reset_index()


def grounding_intervals(ground_dir: Path, seed: int, resamples: int = RESAMPLES) -> dict[str, Any]:
    """Each localization metric's interval: the average (class-stratified bootstrap over phrases) and each
    class (bootstrap over its phrases), as Interval dicts."""
    if not (ground_dir / "scores.parquet").is_file():
        return {}
    items = phrase_scores(ground_dir)
    if items.empty:
        return {}

    def over(frame: Any, strata: Any) -> dict[str, Any]:
        return {
            m: bootstrap_mean(frame[m].to_numpy(), strata, resamples, seed=seed, over="phrases").as_dict()
            for m in GROUND_METRICS
        }

    classes = {str(c): over(g, None) for c, g in items.groupby("category", sort=True)}
    return {"average": over(items, items["category"].to_numpy()), "classes": classes}


# --- the models a verdict compares ------------------------------------------------------------------


def _kind(entry: Mapping[str, Any]) -> str | None:
    encoder = (entry.get("setting") or {}).get("text_encoder")
    if encoder:
        return str(encoder)
    frozen = (entry.get("training") or {}).get("frozen_text")
    return None if frozen is None else "frozen" if frozen else "learnable"


def compared_models(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The models (setting groups, else runs) with their kind, base model, training text and member runs."""
    runs, groups = metrics.get("runs", {}), metrics.get("groups") or {}
    found = []
    for name, entry in (groups or runs).items():
        members = list(entry.get("runs", [name])) if groups else [name]
        first = runs.get(members[0], {})
        setting = entry.get("setting") or first.get("setting") or {}
        kind = _kind(entry) or _kind(first)
        if setting.get("training") not in (None, "full"):  # LoRA: a third point, not one of the paper's two models
            kind = f"{kind} + {setting['training']}"
        found.append({"name": name, "kind": kind, "base": setting.get("base_model"),
                      "encoder": setting.get("encoder"), "source": setting.get("prompt_source"),
                      "runs": members})  # fmt: skip
    return found


def pairs(metrics: Mapping[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(frozen, learnable) per base model and text encoder, trained on impressions (the paper's comparison); a
    model trained on other texts stands in only when no impression-trained one of its kind exists."""
    found = compared_models(metrics)
    out = []
    for start in dict.fromkeys((m["base"], m["encoder"]) for m in found):
        same = [m for m in found if (m["base"], m["encoder"]) == start]
        chosen = []
        for kind in ("frozen", "learnable"):
            of_kind = [m for m in same if m["kind"] == kind]
            chosen.append(next((m for m in of_kind if m["source"] in (None, "impression")), None) or
                          (of_kind[0] if of_kind else None))  # fmt: skip
        if all(chosen):
            out.append((chosen[0], chosen[1]))
    return out


# --- the differences ------------------------------------------------------------------------------


def _run_value(entry: Mapping[str, Any], side: str, name: str | None) -> float | None:
    if side == "interpretability":
        return (((entry.get("grounding") or {}).get("average") or {}).get("cnr") or {}).get("mean")
    return next((f.get("value") for f in entry.get("fidelity") or [] if f.get("name") == name), None)


def _cnr_bootstrap(out: Path, frozen: str, learnable: str, seed: int, resamples: int) -> Interval | None:
    """CNR(frozen) − CNR(learnable), paired bootstrap over the phrases both grounded, class-stratified."""
    dirs = [out / "runs" / n / "ground" for n in (frozen, learnable)]
    if not all((d / "scores.parquet").is_file() for d in dirs):
        return None
    merged = phrase_scores(dirs[0]).merge(phrase_scores(dirs[1]), on=ITEM, suffixes=("_f", "_l"))
    f, learn = merged["cnr_f"].to_numpy(), merged["cnr_l"].to_numpy()
    return bootstrap_difference(lambda i: float(f[i].mean()), lambda i: float(learn[i].mean()), len(merged),
                                paired=True, strata=merged["category"].to_numpy(), resamples=resamples, seed=seed,
                                over="phrases")  # fmt: skip


def _fd_bootstrap(out: Path, frozen: str, learnable: str, name: str, seed: int, resamples: int) -> Interval | None:
    """FD(learnable) − FD(frozen) over the generated images of each, against the same real features."""
    files = [features_file(out / "runs" / n / "features", name) for n in (learnable, frozen)]
    if not all(f.is_file() for f in files):
        return None
    with np.load(files[0]) as a, np.load(files[1]) as b:
        if a["real"].shape != b["real"].shape or not np.allclose(a["real"], b["real"]):
            return None  # measured against different real sets: no paired comparison
        return frechet_difference(a["real"], a["fake"], b["fake"], resamples, seed=seed)


def side_verdict(
    metrics: Mapping[str, Any], out: Path, frozen: Mapping[str, Any], learnable: Mapping[str, Any], side: str,
    seed: int, resamples: int, fd_resamples: int,
) -> dict[str, Any] | None:  # fmt: skip
    """One half of the trade-off: the difference (interpretability: CNR frozen − learnable, expected > 0;
    fidelity: distance learnable − frozen, expected < 0), its interval and the verdict."""
    runs = metrics.get("runs", {})
    name = None
    if side == "fidelity":
        names = [
            [f.get("name") for f in runs[r].get("fidelity") or []] for r in (frozen["runs"][0], learnable["runs"][0])
        ]
        name = next((n for n in names[0] if n in names[1]), None)
        if name is None:
            return None
    values = [[v for r in m["runs"] if (v := _run_value(runs[r], side, name)) is not None] for m in (frozen, learnable)]
    if not all(values):
        return None
    sign = 1 if side == "interpretability" else -1
    if min(len(v) for v in values) >= 2:
        a, b = (values[0], values[1]) if sign > 0 else (values[1], values[0])
        diff = trainings_difference(a, b)
    elif side == "interpretability":
        diff = _cnr_bootstrap(out, frozen["runs"][0], learnable["runs"][0], seed, resamples)
    else:
        diff = _fd_bootstrap(out, frozen["runs"][0], learnable["runs"][0], name, seed, fd_resamples)
    if diff is None:
        return None
    return {
        "side": side,
        "metric": "CNR" if side == "interpretability" else name,
        "frozen": float(np.mean(values[0])),
        "learnable": float(np.mean(values[1])),
        "difference": diff.as_dict(),
        "expected_sign": sign,
        "verdict": verdict(diff, sign),
        "over": "trainings" if diff.short_method.startswith("Welch") else "bootstrap",
    }


def verdicts(
    metrics: Mapping[str, Any], out: Path, seed: int, resamples: int = RESAMPLES,
    fd_resamples: int = FRECHET_RESAMPLES,
) -> list[dict[str, Any]]:  # fmt: skip
    """metrics.json's `verdicts`: per base model, the frozen and learnable model and both halves' verdicts."""
    found = []
    for frozen, learnable in pairs(metrics):
        sides = [side_verdict(metrics, out, frozen, learnable, side, seed, resamples, fd_resamples)
                 for side in ("interpretability", "fidelity")]  # fmt: skip
        found.append({"base": frozen["base"], "encoder": frozen["encoder"], "frozen": frozen["name"],
                      "learnable": learnable["name"],
                      "trainings": [len(frozen["runs"]), len(learnable["runs"])],
                      "sides": [s for s in sides if s is not None]})  # fmt: skip
    return found


def overall(sides: Sequence[Mapping[str, Any]]) -> str:
    """The trade-off's verdict from its halves: "reproduced" or "opposite" only when both halves are."""
    found = {s["verdict"] for s in sides}
    if len(sides) == 2 and found == {"reproduced"}:
        return "reproduced"
    if len(sides) == 2 and found == {"opposite"}:
        return "opposite"
    if {"reproduced", "opposite"} <= found:
        return "mixed (one half reproduced, the other opposite)"
    if "reproduced" in found:
        return "partly reproduced"
    return "partly opposite" if "opposite" in found else "not distinguishable here"
