"""Runs grouped by setting, and each group's numbers as mean ± std over its trainings (Table 1's ±).

A group is every run whose fine-tuning settings are equal but for the seed: the settings the finetune step
recorded in its manifest (text encoder frozen or learnable, text source, learning rate, batch, data and base
model by identity, ...), plus the steps trained and the weights exported. Folder names never decide a group;
`--label NAME=DIR` only names the group that DIR's run belongs to. Runs of different settings are never pooled.

The paper's ± is the standard deviation "over three different trainings". We take the sample standard deviation
(ddof = 1, `TRAININGS_DDOF`): the usual estimate of the spread between trainings from a few of them, pandas'
default and the same convention as `ground --runs`. Grounding noise seeds (`--runs`) are another source of
variance, kept apart as `noise_seed_std`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.artifacts import MANIFEST, input_identity, read_manifest
from cxrdiff.errors import InputError
from cxrdiff.metrics.score import Score
from cxrdiff.report.config import check_name
from cxrdiff.report.records import Localization, RunResult, read_dict

TRAININGS_DDOF = 1
GROUND_METRICS = ("auc_roc", "top1", "cnr")
GROUPED_BY = "the finetune manifest's settings without the seed, plus steps and exported weights"


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample std (ddof = 1) over trainings; values that are missing or not finite are left out."""
    kept = np.array([float(v) for v in values if v is not None and math.isfinite(float(v))], dtype=np.float64)
    if not kept.size:
        return {"mean": None, "std": None, "n": 0}
    std = float(kept.std(ddof=TRAININGS_DDOF)) if kept.size > TRAININGS_DDOF else 0.0
    return {"mean": float(kept.mean()), "std": std, "n": int(kept.size)}


# --- grouping -----------------------------------------------------------------------------------


def run_setting(run: Path) -> dict[str, Any]:
    """What decides a run's group: a fine-tune's recorded settings less its seed, with its steps and exported
    weights; a base model (no manifest) is a setting of its own, by identity."""
    run = Path(run)
    if not (run / MANIFEST).is_file():
        return {"base_model": input_identity(run)}
    manifest = read_manifest(run)
    config = manifest.get("config", {})
    recorded = manifest.get("settings")
    if recorded is None:  # a manifest without `settings`: its config, inputs by their hashes
        from cxrdiff.finetune import FinetuneConfig

        recorded = {k: v for k, v in config.items() if k not in FinetuneConfig.NOT_SETTINGS}
        recorded.update({k: v.get("manifest_sha256") or v.get("path") for k, v in manifest["inputs"].items()})
    setting = {k: v for k, v in recorded.items() if k != "seed"}
    setting["steps"] = manifest.get("steps", config.get("steps"))
    setting["weights"] = manifest.get("weights", config.get("export_weights"))
    return setting


def run_summary(run: Path) -> dict[str, Any]:
    """A run's setting in words for the report: text encoder frozen or learnable, which encoder (`encoder`: the
    name of one given to `finetune --text-encoder`, None for the base model's own CLIP), what was trained
    (`trained`: the parts; `training`: `full` or e.g. `LoRA r16`, the manifest's training mode), text source,
    steps, seed (null: a base model)."""
    from cxrdiff.finetune.lora import TrainingMode
    from cxrdiff.text_encoders import read_record, trained_parts

    run = Path(run)
    record = read_record(run)
    encoder = None if record is None else record.name
    if not (run / MANIFEST).is_file():
        return {"text_encoder": None, "encoder": encoder, "trained": None, "training": None, "prompt_source": None,
                "steps": None, "seed": None, "base_model": None}  # fmt: skip
    manifest = read_manifest(run)
    config = manifest.get("config", {})
    frozen = config.get("frozen_text")
    trained = (manifest.get("conditioning") or {}).get("trained")
    if trained is None and frozen is not None:  # a manifest without `conditioning.trained`: from frozen_text
        trained = trained_parts(record, learnable=not frozen)
    return {
        "text_encoder": None if frozen is None else ("frozen" if frozen else "learnable"),
        "encoder": encoder,
        "trained": trained,
        "training": TrainingMode.of_manifest(manifest).label() or "full",
        "prompt_source": config.get("prompt_source", "impression"),
        "steps": manifest.get("steps", config.get("steps")),
        "seed": config.get("seed", manifest.get("seed")),
        "base_model": config.get("base_model"),  # the model it was fine-tuned from (the headline's pairs)
    }


def parse_labels(labels: Sequence[str], runs: Sequence[Path]) -> dict[int, str]:
    """`--label NAME=DIR` → {index of DIR among the runs: NAME}; DIR must be one of the RUN folders."""
    resolved = [Path(r).resolve() for r in runs]
    out: dict[int, str] = {}
    for text in labels:
        name, sep, folder = text.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise InputError(f"--label {text!r}: expected NAME=DIR (DIR one of the RUN folders)")
        path = Path(folder.strip()).resolve()
        if path not in resolved:
            raise InputError(f"--label {text!r}: {folder.strip()} is not one of the RUN folders")
        out[resolved.index(path)] = check_name(name.strip(), f"--label {text!r}")
    return out


def group_runs(runs: Sequence[Path], names: Sequence[str], labels: Sequence[str] = ()) -> dict[str, list[str]]:
    """{group name: [run names]} in the runs' order. Runs share a group exactly when `run_setting` is equal.
    Named by `--label` (two names for one group, or one name for two groups, is refused), else in words."""
    settings = [run_setting(Path(r)) for r in runs]
    keys: list[int] = []  # group index per run
    distinct: list[dict[str, Any]] = []
    for s in settings:
        if s not in distinct:
            distinct.append(s)
        keys.append(distinct.index(s))
    named: dict[int, str] = {}
    for index, name in parse_labels(labels, runs).items():
        group = keys[index]
        if named.get(group, name) != name:
            raise InputError(f"--label {name}: names the same setting as --label {named[group]}")
        named[group] = name
    if len(set(named.values())) != len(named):
        raise InputError("--label: one NAME given to runs of different settings (they are never pooled)")
    summaries = [run_summary(Path(r)) for r in runs]
    _refuse_repeats(runs, keys, summaries)
    first_run = {g: keys.index(g) for g in range(len(distinct))}
    default = _default_names([summaries[first_run[g]] for g in range(len(distinct))], set(named.values()))
    group_names = [named.get(g, default[g]) for g in range(len(distinct))]
    out: dict[str, list[str]] = {n: [] for n in group_names}
    for name, g in zip(names, keys, strict=True):
        out[group_names[g]].append(name)
    return out


def _refuse_repeats(runs: Sequence[Path], keys: Sequence[int], summaries: Sequence[Mapping[str, Any]]) -> None:
    """Two members of one group with one seed, or one folder given twice, are one training counted twice: its
    spread over "trainings" would be zero or halved, and a verdict over them unfounded."""
    seen: dict[tuple[int, Any], Path] = {}
    for run, group, summary in zip(runs, keys, summaries, strict=True):
        folder = Path(run).resolve()
        for key in ((group, folder), (group, ("seed", summary["seed"]))):
            if key[1] == ("seed", None):
                continue
            if key in seen:
                what = "is given twice" if key[1] == folder else f"shares seed {summary['seed']} with {seen[key]}"
                raise InputError(f"{run}: {what}; trainings of one setting need distinct folders and seeds")
            seen[key] = Path(run)


def _default_names(summaries: Sequence[Mapping[str, Any]], taken: set[str]) -> list[str]:
    """Names in words: 'frozen' / 'learnable' / 'base model' (with the text encoder's name when it is not the
    base model's own, and what trained when not every weight: 'frozen + LoRA r16'), then the text source, then
    the steps, and a number last, each added only where the shorter names would clash."""

    def words(s: Mapping[str, Any], depth: int) -> str:
        lora = s.get("training") not in (None, "full") and s["text_encoder"]
        parts = [f"{s['text_encoder']} + {s['training']}" if lora else s["text_encoder"] or "base model"]
        if s.get("encoder"):
            parts[0] = f"{s['encoder']}, {parts[0]}"
        if depth >= 1 and s["prompt_source"] not in (None, "impression"):
            parts.append(str(s["prompt_source"]))
        if depth >= 2 and s["steps"] is not None:
            parts.append(f"{s['steps']} steps")
        return ", ".join(parts)

    names = [words(s, 0) for s in summaries]
    for depth in (1, 2, 3):
        clash = [i for i, n in enumerate(names) if names.count(n) > 1 or n in taken]
        for i in clash:
            names[i] = words(summaries[i], depth) if depth < 3 else f"{words(summaries[i], 2)} (setting {i + 1})"
    return names


# --- aggregation over trainings -------------------------------------------------------------------


def _grounding_cell(cells: Sequence[Localization | None]) -> dict[str, Any]:
    """One class (or the average) over trainings: each metric's mean ± std, the phrases of the first."""
    found = [c for c in cells if c]
    if not found:
        return {}
    out: dict[str, Any] = {"n": found[0].n}
    for m in GROUND_METRICS:
        out[m] = mean_std([cell.mean if (cell := c.measure(m)) else None for c in found])
    return out


def _value(score: Score | None) -> float | None:
    return score.value if score else None


def aggregate(entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One group's numbers over its trainings (each entry one run of metrics.json's `runs`)."""
    runs = [RunResult.read("", e) for e in entries]
    classes = sorted({c for r in runs for c in r.grounding.classes})
    grounding = {
        "classes": {c: _grounding_cell([r.grounding.at(c) for r in runs]) for c in classes},
        "average": _grounding_cell([r.grounding.average for r in runs]),
    }
    averages = [r.grounding.average for r in runs]
    noise = {m: mean_std([cell.std if a and (cell := a.measure(m)) else None for a in averages])["mean"]
             for m in GROUND_METRICS}  # fmt: skip
    first = read_dict(entries[0].get("setting"))  # written back whole: every key the run recorded
    return {
        "trainings": len(runs),
        "seeds": [r.setting.seed for r in runs],
        "setting": {k: v for k, v in first.items() if k != "seed"},
        "grounding": grounding,
        "noise_seed_std": {"average": noise},
        "fidelity": _scores(entries, "fidelity"),
        "fidelity_ms_cxr": _scores(entries, "fidelity_ms_cxr"),
        "diversity": mean_std([_value(r.diversity) for r in runs]),
        "diversity_ms_cxr": mean_std([_value(r.diversity_ms_cxr) for r in runs]),
        "n_generated": runs[0].n_generated,
        "n_generated_ms_cxr": runs[0].n_generated_ms_cxr,
        "text_source": {
            "source": first.get("prompt_source"),
            "text_encoder": first.get("text_encoder"),
            "cnr": mean_std([r.text_source_cnr for r in runs]),
            "phrases": runs[0].text_phrases,
        },
        "eos": {
            "eos_cnr": mean_std([r.eos_cnr for r in runs]),
            "class_word_cnr": mean_std([r.class_word_cnr for r in runs]),
        },
    }


def _scores(entries: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any]:
    """Each named score (a Fréchet distance) as mean ± std over trainings, with its title and label (as the run
    recorded it: absent stays null)."""
    out: dict[str, Any] = {}
    lists = [e.get(key) or [] for e in entries]
    names = list(dict.fromkeys(s["name"] for scores in lists for s in scores))
    for name in names:
        found = [s for scores in lists for s in scores if s["name"] == name]
        out[name] = {
            **mean_std([s.get("value") for s in found]),
            "title": Score.from_dict(found[0]).title,
            "label": found[0].get("label"),
        }
    return out


def groups(runs: Mapping[str, Mapping[str, Any]], members: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """metrics.json's `groups`: each group's run names and its numbers over trainings."""
    return {g: {"runs": list(names), **aggregate([runs[n] for n in names])} for g, names in members.items()}
