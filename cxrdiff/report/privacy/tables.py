"""The privacy section's tables: copy rates per run beside the rate of a model that copies nothing, the
memorization score with the words that carry it, and the copy rate over training."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cxrdiff.report.document import Table

PROMPT_CHARS = 70  # prompts shown in tables are cut to this many characters


def _percent(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("rate") is None:
        return "—"
    label = f" ({entry['label']})" if entry.get("label") else ""
    return f"{100 * entry['rate']:.1f} [{100 * entry['low']:.1f}, {100 * entry['high']:.1f}]{label}"


def _cut(text: str) -> str:
    return text if len(text) <= PROMPT_CHARS else text[: PROMPT_CHARS - 1] + "…"


def measured_runs(metrics: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The runs with a measured copy rate, by name: their privacy entries."""
    return {n: r["privacy"] for n, r in metrics.get("runs", {}).items() if (r.get("privacy") or {}).get("copy_rate")}


def privacy_tables(metrics: Mapping[str, Any]) -> list[Table]:
    """The copy rates per run (beside the rate a model that copies nothing gives), the memorization score and
    the copy rate over training; none without privacy measures."""
    runs = measured_runs(metrics)
    skipped = {(r.get("privacy") or {}).get("skipped") for r in metrics.get("runs", {}).values()} - {None}
    if not runs:
        if not skipped:
            return []
        return [Table("Privacy: not measured", ["reason"], [[s] for s in sorted(skipped)], kind="settings")]
    first = next(iter(runs.values()))
    q = first["copy_rate"]["quantile"]
    rows = [
        [
            "a model that copies nothing",
            "expected (the calibration's nominal rate)",
            "any",
            f"{100 * (1 - q):.1f}",
            "—",
            "—",
            "—",
            "—",
            "—",
            "—",
        ]
    ]
    for name, p in runs.items():
        for key in ("copy_rate", "copy_rate_pixels"):
            e = p.get(key)
            if not e or (key == "copy_rate_pixels" and p["copy_rate"] is e):
                continue
            rows.append(
                [
                    name,
                    "this report",
                    e["measure"],
                    _percent(e),
                    f"{e['copies']} / {e['n']}",
                    f"{e['threshold']:.3f}",
                    f"{e['generated_median']:.3f}",
                    f"{e['held_out_median']:.3f}",
                    _p_value(e.get("copy_test_p")),
                    _p_value((e.get("similarity_test") or {}).get("p_value")),
                ]
            )
    searched = first.get("searched", "all")
    copy = [
        Table(
            "Privacy: copy rate against the training set",
            [
                "model",
                "source",
                "measure",
                "copy rate % [95% CI]",
                "copies / generated",
                "threshold",
                "median: generated → training",
                "median: held-out → training",
                "p: more copies than copy-free",
                "p: same law as held-out (KS)",
            ],
            rows,
            f"A generated image is a copy when it is closer to its nearest training image (searched: {searched}, "
            f"{first.get('training_images', '?')} images) than {q:.0%} of the {first.get('held_out_images', '?')} "
            "real held-out test images are to theirs (the split-conformal quantile); a model that copies nothing gives "
            f"about {1 - q:.0%}. Interval: Wilson, over the generated images (the threshold's own noise not in it). "
            "'More copies than copy-free': the exact one-sided p-value of the copy count, whose law for a model that "
            "copies nothing is BetaBinomial(generated, held-out + 1 − k, k) with k the threshold's rank, assuming its "
            "images are as close to the training set as fresh real ones (exchangeable); 'same law': a two-sample "
            "Kolmogorov–Smirnov test of that assumption (the medians say which way they differ). Medians: each "
            "image's similarity to its nearest training image (cosine of features, or Pearson correlation of pixels).",
        )
    ]
    return [*copy, *_memorization_table(runs), *_over_training_table(metrics, q)]


def _p_value(p: float | None) -> str:
    if p is None:
        return "—"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _memorization_table(runs: Mapping[str, Any]) -> list[Table]:
    """Dutt et al.'s score per prompt: training texts against held-out prompts, and the words that carry it."""
    tables: list[Table] = []
    memorized = {n: p["memorization"] for n, p in runs.items() if (p.get("memorization") or {}).get("training")}
    if memorized:
        rows = []
        for name, m in memorized.items():
            for key, what in (("training", "training texts"), ("held_out", "held-out test prompts")):
                part = m[key]
                top = "; ".join(f"{_cut(s['prompt'])} ({s['score']:.3g})" for s in part["prompts"][:3]) or "—"
                mean = "—" if part["mean"] is None else f"{part['mean']:.3g}"
                mean += f" ± {part['std']:.2g}" if part.get("std") else ""
                words = ""
                if key == "training":
                    words = ", ".join(f"{w['word']} ({100 * w['share']:.0f} %)" for w in m.get("words", [])[:5])
                rows.append([name, f"{what} ({part['n']})", mean, top, words or "—"])
        m = next(iter(memorized.values()))
        tables.append(
            Table(
                "Privacy: memorization score per prompt (Dutt et al.)",
                ["model", "prompts", "mean score ± std", "highest-scoring prompts (score)", "words carrying the score"],
                rows,
                f"Score: ‖ε(x_t, prompt) − ε(x_t, empty)‖₂ over the {m['latent_elements']} latent elements, "
                f"averaged over {m['steps']} DDIM steps (guidance {m['guidance']:g}) and {m['noise_per_prompt']} noise "
                "draws per prompt (Wen et al. 2024; Dutt et al., arXiv 2502.07516). A memorized training prompt scores "
                "above the held-out ones. Words: each word's share of the prompt's cross-attention (start and end "
                "tokens left out) times the prompt's score, summed over the training prompts, as a share of their "
                "summed score.",
            )
        )
    return tables


def _over_training_table(metrics: Mapping[str, Any], q: float) -> list[Table]:
    """The copy rate of each kept checkpoint beside its CNR and fidelity (with --checkpoints)."""
    tables: list[Table] = []
    rows = []
    for name, r in metrics.get("runs", {}).items():
        for point in r.get("checkpoints") or []:
            if not point.get("copy_rate"):
                continue
            cnr = ((point.get("grounding") or {}).get("cnr") or {}).get("mean")
            f = point.get("fidelity")
            rows.append(
                [
                    name + (" (final model)" if point.get("source") != "checkpoint" else ""),
                    f"{point['step']:,}",
                    _percent(point["copy_rate"]),
                    _percent(point.get("copy_rate_pixels")),
                    "—" if cnr is None else f"{cnr:.2f}",
                    "—" if not f else f"{f['name']} {f['value']:.1f}",
                ]
            )
    if rows:
        tables.append(
            Table(
                "Privacy over training: copy rate, CNR and fidelity per kept checkpoint",
                ["model", "step", "copy rate % (features)", "copy rate % (pixels)", "CNR", "fidelity"],
                rows,
                f"Expected without copying: about {1 - q:.0%}. The accuracy–interpretability–privacy front over "
                "training, frozen against learnable text encoders: each checkpoint's samples measured as the run's.",
            )
        )
    return tables
