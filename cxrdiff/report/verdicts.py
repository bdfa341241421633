"""Intervals for what a report measured, and the differences its verdicts are judged on.

Localization: a bootstrap over the MS-CXR phrases of one run (class-stratified, so every class keeps its
count and the sample-weighted average keeps its weights), on the per-phrase scores the ground step wrote.

A verdict compares the frozen and the learnable model fine-tuned from the same base, side by side on both
halves of the trade-off, and says "reproduced" or "opposite" only when the difference's interval over
trainings excludes zero; otherwise "not distinguishable here" (`metrics.intervals.verdict`), with the trainings
per model that would decide it. A verdict needs two or more trainings per model (Welch's t on the runs' values:
the spread the paper's ± describes). With one training per model, or 2+ against 1, the same two runs' difference
is shown with a bootstrap over this training's phrases (paired: the same phrases grounded by both), or generated
images (paired: the same prompts and noise), and no verdict: that interval says which phrases were drawn, not
how another training would differ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.errors import InputError
from cxrdiff.metrics.intervals import (
    FRECHET_RESAMPLES,
    LEVEL,
    MIN_PHRASES,
    NO_VERDICT,
    NOT_DISTINGUISHABLE,
    OPPOSITE,
    POWER,
    REPRODUCED,
    RESAMPLES,
    Interval,
    bootstrap_difference,
    bootstrap_mean,
    frechet_difference,
    frechet_infinity,
    holm,
    trainings_difference,
    trainings_for_power,
    verdict,
    welch_p_value,
    welch_power,
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
    class (bootstrap over its phrases; no bounds, "too few (n)", below MIN_PHRASES phrases), as Interval dicts."""
    if not (ground_dir / "scores.parquet").is_file():
        return {}
    items = phrase_scores(ground_dir)
    if items.empty:
        return {}

    def over(frame: Any, strata: Any) -> dict[str, Any]:
        if strata is None and len(frame) < MIN_PHRASES:  # a class of 2-9 phrases: its interval covers 50-90 %
            return {m: Interval(float(frame[m].mean()), None, None, method="bootstrap over phrases", n=len(frame),
                                reason=f"too few ({len(frame)})").as_dict() for m in GROUND_METRICS}  # fmt: skip
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
    """CNR(frozen) − CNR(learnable), paired bootstrap over the phrases both grounded, class-stratified. A
    non-finite CNR is refused: dropping the resamples that draw it would bias the interval silently."""
    dirs = [out / "runs" / n / "ground" for n in (frozen, learnable)]
    if not all((d / "scores.parquet").is_file() for d in dirs):
        return None
    merged = phrase_scores(dirs[0]).merge(phrase_scores(dirs[1]), on=ITEM, suffixes=("_f", "_l"))
    f, learn = merged["cnr_f"].to_numpy(), merged["cnr_l"].to_numpy()
    for folder, values in zip(dirs, (f, learn), strict=True):
        if not np.all(np.isfinite(values)):
            raise InputError(f"{folder / 'scores.parquet'}: {int(np.sum(~np.isfinite(values)))} phrases have a "
                             "non-finite CNR (e.g. a box covering the whole image); the paired bootstrap needs "
                             "every phrase's CNR")  # fmt: skip
    return bootstrap_difference(lambda i: float(f[i].mean()), lambda i: float(learn[i].mean()), len(merged),
                                paired=True, strata=merged["category"].to_numpy(), resamples=resamples, seed=seed,
                                over="phrases")  # fmt: skip


def _fd_bootstrap(
    out: Path, frozen: str, learnable: str, name: str, seed: int, resamples: int
) -> tuple[Interval, list[float]] | None:
    """FD(learnable) − FD(frozen) over the generated images, against the same real features, paired when both
    runs generated as many images (the report samples every run from the same prompts and noise seeds, in one
    order); with each run's bias-corrected FD∞ (learnable, frozen)."""
    files = [features_file(out / "runs" / n / "features", name) for n in (learnable, frozen)]
    if not all(f.is_file() for f in files):
        return None
    with np.load(files[0]) as a, np.load(files[1]) as b:
        if a["real"].shape != b["real"].shape or not np.allclose(a["real"], b["real"]):
            return None  # measured against different real sets: no paired comparison
        paired = len(a["fake"]) == len(b["fake"])
        diff = frechet_difference(a["real"], a["fake"], b["fake"], resamples, seed=seed, paired=paired)
        return diff, [frechet_infinity(a["real"], fake, seed=seed) for fake in (a["fake"], b["fake"])]


def _spread_and_power(values: Sequence[Sequence[float]], diff: Interval) -> dict[str, Any]:
    """For a difference over trainings: each model's spread (sample s.d.), Welch's p-value, and for one that is
    not distinguishable the trainings per model an 80 %-power Welch test would need were the observed
    difference and spreads the true ones, and the power of 3 trainings each (the demo's `--trainings 3`)."""
    sd = [float(np.std(v, ddof=1)) for v in values]
    out: dict[str, Any] = {"spread": sd, "p_value": welch_p_value(values[0], values[1])}
    if diff.has_bounds and not diff.excludes_zero():
        out["power"] = {
            "difference": diff.value,
            "needed": trainings_for_power(diff.value, sd[0], sd[1]),
            "target": POWER,
            "at_3": welch_power(diff.value, sd[0], sd[1], 3),
            "method": "simulated Welch tests (20,000, normal trainings) at the observed difference and spreads",
        }
    return out


def side_verdict(
    metrics: Mapping[str, Any], out: Path, frozen: Mapping[str, Any], learnable: Mapping[str, Any], side: str,
    seed: int, resamples: int, fd_resamples: int,
) -> dict[str, Any] | None:  # fmt: skip
    """One half of the trade-off: the difference (interpretability: CNR frozen − learnable, expected > 0;
    fidelity: distance learnable − frozen, expected < 0), its interval and the verdict.

    A verdict needs 2+ trainings per model (Welch's t over trainings). With one training per model, or an unequal
    design (2+ against 1), the difference is that of the first run of each, with the bootstrap over this
    training's phrases (or images), and the verdict is "no verdict": the bootstrap holds which phrases were drawn,
    not how another training would differ (it covers the over-trainings difference in about 1 run in 5)."""
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
    found: dict[str, Any] = {"side": side, "metric": "CNR" if side == "interpretability" else name,
                             "expected_sign": sign, "trainings": [len(v) for v in values]}  # fmt: skip
    if side == "fidelity":  # how many images each distance rests on (the paper's FID: 5,000)
        found["images"] = [runs[m["runs"][0]].get("n_generated") for m in (frozen, learnable)]
    if min(len(v) for v in values) >= 2:
        a, b = (values[0], values[1]) if sign > 0 else (values[1], values[0])
        diff = trainings_difference(a, b)
        found |= _spread_and_power((a, b), diff)
        found |= {"over": "trainings", "verdict": verdict(diff, sign)}
        found |= {"frozen": float(np.mean(values[0])), "learnable": float(np.mean(values[1]))}
    else:
        first = (frozen["runs"][0], learnable["runs"][0])
        if side == "interpretability":
            diff = _cnr_bootstrap(out, *first, seed, resamples)
        else:
            measured = _fd_bootstrap(out, *first, name, seed, fd_resamples)
            diff = measured and measured[0]
            if measured:
                found["infinity"] = {"learnable": measured[1][0], "frozen": measured[1][1]}
        if diff is None:
            return None
        unequal = max(len(v) for v in values) > 1
        reason = (f"unequal trainings ({len(values[0])} vs {len(values[1])}): the same two runs compared"
                  if unequal else "one training per model")  # fmt: skip
        found |= {"over": "bootstrap", "verdict": f"{NO_VERDICT} ({reason}; a verdict needs 2+ trainings per model)",
                  "compared": list(first), "frozen": float(values[0][0]), "learnable": float(values[1][0])}  # fmt: skip
    found["difference"] = diff.as_dict()
    return found


def verdicts(
    metrics: Mapping[str, Any], out: Path, seed: int, resamples: int = RESAMPLES,
    fd_resamples: int = FRECHET_RESAMPLES,
) -> list[dict[str, Any]]:  # fmt: skip
    """metrics.json's `verdicts`: per base model, the frozen and learnable model, both halves' verdicts and the
    trade-off's (`overall`). Every half with a Welch p-value gets its Holm-adjusted one (`p_holm`) over all the
    halves shown, of every base model (the demo's --text-init both, --text-encoders clip,bert), for the one-half
    claims."""
    found = []
    for frozen, learnable in pairs(metrics):
        sides = [side_verdict(metrics, out, frozen, learnable, side, seed, resamples, fd_resamples)
                 for side in ("interpretability", "fidelity")]  # fmt: skip
        found.append({"base": frozen["base"], "encoder": frozen["encoder"], "frozen": frozen["name"],
                      "learnable": learnable["name"],
                      "trainings": [len(frozen["runs"]), len(learnable["runs"])],
                      "sides": [s for s in sides if s is not None]})  # fmt: skip
    shown = [s for v in found for s in v["sides"] if s.get("p_value") is not None]
    for side, adjusted in zip(shown, holm([s["p_value"] for s in shown]) if shown else [], strict=True):
        side["p_holm"] = adjusted
    for v in found:
        v["overall"] = overall(v["sides"])
    return found


def overall(sides: Sequence[Mapping[str, Any]]) -> str:
    """The trade-off's verdict from its halves. "reproduced" / "opposite" / "mixed" need both halves judged so
    (each at 5 %: a claim that both hold needs no correction). A one-half claim ("partly reproduced") is a
    union over the halves shown, so the half must pass Holm's correction over them (its Holm-adjusted Welch
    p-value below 5 %: `p_holm` when `verdicts` adjusted over every base model's halves, else over these).
    No half with a verdict (one training per model): "no verdict", never a verdict word."""
    judged = [s for s in sides if not str(s["verdict"]).startswith(NO_VERDICT)]
    if not judged:
        reasons = sorted({str(s["verdict"]) for s in sides})
        return reasons[0] if len(reasons) == 1 else f"{NO_VERDICT} (a verdict needs 2+ trainings per model)"
    found = [s["verdict"] for s in judged]
    if len(sides) == 2 and len(judged) == 2:
        if set(found) == {REPRODUCED}:
            return REPRODUCED
        if set(found) == {OPPOSITE}:
            return OPPOSITE
        if set(found) == {REPRODUCED, OPPOSITE}:
            return "mixed (one half reproduced, the other opposite)"
    if all("p_holm" in s or s.get("p_value") is None for s in sides):  # adjusted over every half shown
        adjusted = [s.get("p_holm", 1.0) for s in sides]
    else:
        adjusted = holm([1.0 if s.get("p_value") is None else s["p_value"] for s in sides])
    kept = {s["verdict"] for s, p in zip(sides, adjusted, strict=True) if p < 1.0 - LEVEL}
    if REPRODUCED in kept:
        return "partly reproduced (Holm over the halves shown)"
    if OPPOSITE in kept:
        return "partly opposite (Holm over the halves shown)"
    return NOT_DISTINGUISHABLE


# --- in words (the report page and the demo's summary print these) ------------------------------------


def evidence_words(side: Mapping[str, Any]) -> str:
    """What the difference's interval is over: "over 3 vs 3 trainings (Welch's t)", or for one training
    "this training's phrases (bootstrap, paired, ...)" with the reason there is no verdict."""
    diff = Interval.from_dict(side["difference"])
    if side["over"] == "trainings":
        return f"over {diff.n[0]} vs {diff.n[1]} trainings (Welch's t)"
    items = "phrases" if side["side"] == "interpretability" else "generated images"
    runs = " and ".join(side.get("compared") or [])
    how = diff.method.removeprefix(f"bootstrap over {items}, ").removeprefix("bootstrap over generated images, ")
    return (f"95% interval over this training's {items} ({runs}; bootstrap, {how}): it holds which {items} were "
            "drawn, not how another training would differ")  # fmt: skip


def power_words(side: Mapping[str, Any], digits: int = 2) -> str:
    """For a half that is not distinguishable over trainings: the observed difference, the spread over
    trainings and the trainings per model that would decide it with 80 % power (empty otherwise)."""
    power = side.get("power")
    if not power:
        return ""
    sd = side["spread"]
    needed = power["needed"]
    need = (f"{needed} trainings per model would detect it with {100 * power['target']:.0f}% power"
            if needed else "no practical number of trainings would detect it")  # fmt: skip
    return (
        f"observed difference {power['difference']:.{digits}f}, spread over trainings (s.d.) "
        f"{sd[0]:.{digits}f} and {sd[1]:.{digits}f}: were these the truth, {need} (Welch, two-sided 5%); "
        f"3 trainings each have {100 * power['at_3']:.0f}% ({power['method']})"
    )


def summary_words(side: Mapping[str, Any], digits: int = 2) -> str:
    """One half in one line for a console: the verdict (or why none), then the difference with its interval and
    what the interval is over, e.g. "no verdict (one training per model; ...): difference 0.20 [0.10, 0.30]
    over this training's phrases"."""
    diff = Interval.from_dict(side["difference"])
    items = "phrases" if side["side"] == "interpretability" else "generated images"
    over = "over trainings" if side["over"] == "trainings" else f"over this training's {items}"
    return f"{side['verdict']}: {side['metric']} difference {diff.text(digits)} {over}"


def trade_off_words(found: Mapping[str, Any]) -> str:
    """The trade-off's closing line, bold where it is a verdict; with one training per model it says what a
    verdict would need instead."""
    said = found.get("overall") or overall(found["sides"])
    if said.startswith(NO_VERDICT):
        return (f"**The trade-off (frozen: more interpretable, learnable: images closer to real): {said}.** The "
                "differences above are one training's; train each model twice or more (--seed, or the demo's "
                "--trainings) for a verdict.")  # fmt: skip
    said += "" if said.endswith(" here") or "(" in said else " here"
    return (f"**The trade-off (frozen: more interpretable, learnable: images closer to real) is {said}**: a half "
            "counts as reproduced or opposite only when its 95% interval over trainings excludes zero; a claim on "
            "one half alone passes Holm's correction over the halves shown.")  # fmt: skip
