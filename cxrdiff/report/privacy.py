"""Does the model reproduce its training patients' images? The report's privacy section, per run.

For every generated image of a run (the p19 samples), its nearest training image over the prepared folder's
training set (the train shards' `image_path`, read at the generated size): by cosine similarity of features on
one network (`--privacy-features`, default the first `--features` network) and by Pearson correlation of the
pixels (`--privacy-pixels` px). What counts as a copy is calibrated on the real held-out test images (p19
patients, never trained on): the threshold is the split-conformal `--privacy-quantile` of their nearest-training
similarities (`metrics.privacy.copy_threshold`), and the copy rate is the share of generated images above it,
with a Wilson interval. A model that copies nothing lands near the nominal 1 − quantile (5 %); whether a run copies
more is the exact one-sided test `metrics.privacy.copy_count_test` (calibration noise included), and whether its
similarities follow the held-out images' law a two-sample KS test. The run's entry of metrics.json holds it under
"privacy" → "copy_rate" (features) and "copy_rate_pixels".

The closest pairs (generated | nearest training image, with their similarity) are drawn, since a person judges
a copy by looking; Dutt et al.'s memorization score (‖ε(x_t, c) − ε(x_t, ∅)‖ over a DDIM trajectory) is scored
on training prompts (the run's own training text, `finetune --deid-markers` applied) and as many held-out ones,
with the words that carry it (each word's share of the prompt's cross-attention, captured over the same
trajectory, times the prompt's score). With `--checkpoints` the copy rate is measured at every checkpoint.

Training features and pixels are cached in `<out>/.features_cache/` (200k MIMIC images take a while on a GPU;
`--privacy-max-train N` searches a seeded sample of N instead, and says so), each run's result in
`runs/<name>/privacy.json` under the key of these settings and the folders' identities.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.artifacts import MANIFEST, input_identity, read_manifest, settings_key
from cxrdiff.console import log
from cxrdiff.figures import bounded_dpi
from cxrdiff.metrics.privacy import (
    Nearest,
    copy_count_test,
    copy_rate,
    copy_threshold,
    nearest_training,
    pixel_correlation,
    similarity_test,
)
from cxrdiff.report.config import ReportConfig
from cxrdiff.report.document import Table
from cxrdiff.report.features import (
    CACHE,
    cached_features,
    cached_pixels,
    load_network,
    privacy_spec,
    spec_identity,
)
from cxrdiff.report.measure import classifier_key
from cxrdiff.report.steps import cached, identity, image_path, image_size, read_table

TRAIN_CHUNK = 20_000  # training rows per block of the search (bounds the float copy of the training set)
PROMPT_CHARS = 70  # prompts shown in tables are cut to this many characters
TOP_WORDS = 8


def privacy_settings(config: ReportConfig, classifier: Any = None) -> dict[str, Any]:
    """What decides the privacy numbers besides the folders measured."""
    spec = privacy_spec(config, classifier)
    keys = ("privacy_max_train", "privacy_quantile", "privacy_pixels", "privacy_pairs", "seed", "guidance")
    keys += ("memorization_prompts", "memorization_noise", "memorization_steps", "random_features")
    return {
        "network": None if spec is None else spec_identity(spec),
        "classifier": classifier_key(config, classifier),
        "weights": {"inception": identity(config.inception_weights), "xrv": identity(config.xrv_weights)},
        **{k: getattr(config, k) for k in keys},
    }


# --- the training set --------------------------------------------------------------------------


def missing_training_images(real: Path) -> str | None:
    """Why the prepared folder's training images cannot be searched, or None."""
    import pyarrow.parquet as pq

    shards = sorted(Path(real).glob("train-*.parquet"))
    if not shards:
        return "the prepared folder has no train shards"
    if "image_path" not in pq.read_schema(shards[0]).names:
        return "the train shards record no image_path (prepared by an older cxrdiff)"
    return None


def privacy_unavailable(config: ReportConfig, real: Path) -> str | None:
    """Why the privacy measures cannot run on this prepared folder (no training images, or too few held-out
    images to calibrate the copy threshold), or None."""
    import math

    import pyarrow.parquet as pq

    reason = missing_training_images(real)
    if reason is not None:
        return reason
    held_out = pq.read_metadata(Path(real) / "test.parquet").num_rows
    q = config.privacy_quantile
    need = math.ceil(q / (1 - q))
    if held_out < need:
        return f"{held_out} held-out test images cannot calibrate --privacy-quantile {q:g} (it needs {need} or more)"
    return None


def training_rows(config: ReportConfig, real: Path) -> tuple[Any, int]:
    """The training rows searched (image_path, impression and labels; all, or a seeded sample of
    `--privacy-max-train` in shard order) and how many there are in all."""
    import pandas as pd
    import pyarrow.parquet as pq

    from cxrdiff.data import LABELS

    frames = []
    for shard in sorted(Path(real).glob("train-*.parquet")):
        names = pq.read_schema(shard).names
        columns = [c for c in ("image_path", "impression", *LABELS) if c in names]
        frames.append(pq.read_table(shard, columns=columns).to_pandas())
    table = pd.concat(frames, ignore_index=True)
    total = len(table)
    if config.privacy_max_train is not None and config.privacy_max_train < total:
        keep = np.sort(np.random.default_rng(config.seed).choice(total, config.privacy_max_train, replace=False))
        table = table.iloc[keep].reset_index(drop=True)
    return table, total


def nearest_in_blocks(queries: np.ndarray, train: np.ndarray, pixels: bool) -> Nearest:
    """The nearest training row of each query over the whole training set, a block of rows at a time (the
    training array may be memory-mapped): cosine on features, or Pearson correlation on pixels."""
    best = Nearest(np.zeros(len(queries), np.int64), np.full(len(queries), -np.inf))
    for start in range(0, len(train), TRAIN_CHUNK):
        block = np.asarray(train[start : start + TRAIN_CHUNK])
        found = pixel_correlation(queries, block) if pixels else nearest_training(queries, block)
        better = found.similarity > best.similarity  # strict: ties keep the earlier training row
        best.index[better] = found.index[better] + start
        best.similarity[better] = found.similarity[better]
    return best


def _pixel_r(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norm) if norm else float("nan")


def copy_measure(
    generated: np.ndarray,
    held_out: np.ndarray,
    train: np.ndarray,
    pixels: bool,
    quantile: float,
    what: Mapping[str, Any],
) -> tuple[dict[str, Any], Nearest]:
    """The copy rate of one measure (features or pixels), with its threshold and the similarities' medians."""
    gen_near = nearest_in_blocks(generated, train, pixels)
    test_near = nearest_in_blocks(held_out, train, pixels)
    threshold = copy_threshold(test_near.similarity, quantile)
    rate = copy_rate(gen_near.similarity, threshold)
    statistic, p_same = similarity_test(gen_near.similarity, test_near.similarity)
    entry = {
        **what,
        **rate._asdict(),
        "quantile": quantile,
        "nominal": 1.0 - quantile,
        "held_out_images": len(held_out),
        "generated_median": float(np.median(gen_near.similarity)),
        "held_out_median": float(np.median(test_near.similarity)),
        "interval": "Wilson score interval over the generated images (the threshold's calibration noise not included)",
        # exact one-sided test of "more copies than a copy-free model", calibration noise included
        "copy_test_p": copy_count_test(rate.copies, rate.n, len(held_out), quantile),
        "copy_test": "BetaBinomial(n_gen, n_cal + 1 − k, k) law of the copy count under exchangeability",
        "similarity_test": {"ks": statistic, "p_value": p_same, "test": "two-sample Kolmogorov–Smirnov, two-sided"},
    }
    return entry, gen_near


def _pairs(
    near: Nearest,
    threshold: float,
    fake: Sequence[Path],
    prompts: Sequence[str],
    train_paths: Sequence[Path],
    fake_pixels: np.ndarray,
    train_pixels: np.ndarray,
    count: int,
) -> list[dict[str, Any]]:
    """The `count` generated images closest to their nearest training image, most similar first."""
    order = np.argsort(-near.similarity, kind="stable")[:count]
    out = []
    for i in order:
        j = int(near.index[i])
        out.append(
            {
                "generated": str(fake[i]),
                "training": str(train_paths[j]),
                "similarity": float(near.similarity[i]),
                "pixel_correlation": _pixel_r(fake_pixels[i], train_pixels[j]),
                "copy": bool(near.similarity[i] > threshold),
                "prompt": str(prompts[i]),
            }
        )
    return out


def measure_privacy(
    config: ReportConfig, model: Path | None, samples: Path, real: Path, classifier: Any = None
) -> dict[str, Any]:
    """The privacy entry of one sample folder: copy rates (features, pixels), the closest pairs and, when
    `model` is given and --memorization-prompts > 0, the memorization score."""
    reason = privacy_unavailable(config, real)
    if reason is not None:
        return {"skipped": reason}
    table = read_table(samples / "samples.parquet")
    fake = [samples / f for f in table["file"]]
    prompts = [str(p) for p in table["prompt"]] if "prompt" in table else [""] * len(fake)
    size = image_size(fake[0])
    train, total = training_rows(config, real)
    train_paths = [image_path(p, real) for p in train["image_path"]]
    test = read_table(real / "test.parquet")
    test_paths = [image_path(p, real) for p in test["image_path"]]
    cache = Path(config.out) / CACHE
    sets = {
        "train": f"train:{input_identity(real)}",
        "test": f"test:{input_identity(real)}",
        "generated": f"samples:{input_identity(samples)}",
    }
    pixels = config.privacy_pixels
    train_px = cached_pixels(train_paths, pixels, sets["train"], cache)
    test_px = cached_pixels(test_paths, pixels, sets["test"], cache)
    fake_px = cached_pixels(fake, pixels, sets["generated"], cache)
    q = config.privacy_quantile
    px_rate, px_near = copy_measure(
        fake_px,
        test_px,
        train_px,
        True,
        q,
        {"measure": f"pixel correlation at {pixels} px", "network": None, "label": ""},
    )
    result: dict[str, Any] = {
        "training_images": len(train_paths),
        "training_images_total": total,
        "searched": "all" if len(train_paths) == total else f"a seeded sample of {len(train_paths)} of {total}",
        "held_out_images": len(test_paths),
        "generated_images": len(fake),
        "copy_rate_pixels": px_rate,
        "pairs": {
            "pixels": _pairs(
                px_near, px_rate["threshold"], fake, prompts, train_paths, fake_px, train_px, config.privacy_pairs
            )
        },
    }
    spec = privacy_spec(config, classifier)
    if spec is not None:
        network = load_network(spec, config, classifier)
        train_f = cached_features(network, train_paths, size, sets["train"], cache)
        test_f = cached_features(network, test_paths, size, sets["test"], cache)
        fake_f = cached_features(network, fake, size, sets["generated"], cache)
        what = {"measure": f"cosine on {network.name}", "network": network.name, "label": network.label}
        f_rate, f_near = copy_measure(fake_f, test_f, train_f, False, q, what)
        result["copy_rate"] = f_rate
        result["pairs"]["features"] = _pairs(
            f_near, f_rate["threshold"], fake, prompts, train_paths, fake_px, train_px, config.privacy_pairs
        )
    else:
        result["copy_rate"] = px_rate  # no feature network: the pixel measure is the copy rate
    if model is not None:
        result["memorization"] = memorization(config, model, real, train)
    return result


def measure_privacy_once(
    config: ReportConfig, run: Path, folder: Path, samples: Path, real: Path, classifier: Any, done: list[str]
) -> dict[str, Any]:
    """`measure_privacy` of a run's p19 samples, cached in `folder/privacy.json`; "privacy" joins `done` when
    measured now. Nothing is measured (and the reason is returned) with --no-privacy, without training images or
    with too few held-out images for the threshold."""
    if config.no_privacy:
        return {"skipped": "--no-privacy"}
    reason = privacy_unavailable(config, real)
    if reason is not None:
        log.info("report: no privacy measures: %s", reason)
        return {"skipped": reason}
    key = settings_key(
        {
            **privacy_settings(config, classifier),
            "model": input_identity(run),
            "samples": input_identity(samples),
            "real": input_identity(real),
        }
    )
    measured, fresh = cached(
        folder / "privacy.json", key, lambda: measure_privacy(config, run, samples, real, classifier)
    )
    if fresh:
        done.append("privacy")
    return measured


def copy_rates_over_training(
    config: ReportConfig,
    name: str,
    entry: Mapping[str, Any],
    points: list[dict[str, Any]],
    real: Path,
    classifier: Any,
    done: list[str],
) -> None:
    """Add each checkpoint's copy rates to its point of the curve (`report --checkpoints`): measured on the
    checkpoint's samples (cached beside them); the final point's are the run's own."""
    privacy = entry.get("privacy") or {}
    if config.no_privacy or "skipped" in privacy or not privacy:
        return
    for point in points:
        if point.get("source") != "checkpoint":
            point["copy_rate"] = privacy.get("copy_rate")
            point["copy_rate_pixels"] = privacy.get("copy_rate_pixels")
            continue
        folder = Path(config.out) / "runs" / name / "checkpoints" / f"step-{point['step']:07d}"
        samples = folder / "samples"
        if not (samples / MANIFEST).is_file():
            continue
        key = settings_key(
            {**privacy_settings(config, classifier), "samples": input_identity(samples), "real": input_identity(real)}
        )
        measured, fresh = cached(
            folder / "privacy.json", key, lambda s=samples: measure_privacy(config, None, s, real, classifier)
        )
        if fresh:
            done.append(f"privacy {point['step']}")
        point["copy_rate"] = measured.get("copy_rate")
        point["copy_rate_pixels"] = measured.get("copy_rate_pixels")


# --- the memorization score ------------------------------------------------------------------------


def training_texts(model: Path, train: Any, count: int, seed: int) -> list[str]:
    """Up to `count` distinct, non-empty training texts as the run trained on them (its prompt source and
    --deid-markers, from its manifest; a base model: the impressions), drawn with a fixed seed."""
    from cxrdiff.data import LABELS
    from cxrdiff.finetune.data import TrainingText

    config = read_manifest(model).get("config", {}) if (Path(model) / MANIFEST).is_file() else {}
    source = config.get("prompt_source") or "impression"
    if source.startswith("file:") and not Path(source[5:]).is_file():
        source = "impression"  # the run's prompt file has moved: its impressions stand in
    labels = np.stack([train[c].to_numpy(np.float32) if c in train else np.full(len(train), np.nan) for c in LABELS], 1)
    impressions = list(train["impression"]) if "impression" in train else [""] * len(train)
    text = TrainingText(source, impressions, labels, 0.0, deid_markers=config.get("deid_markers") or "keep")
    rng = np.random.default_rng(seed)
    texts = [text.text(int(i), rng) for i in rng.permutation(len(train))[: count * 4]]
    return list(dict.fromkeys(t for t in texts if t.strip()))[:count]


def word_shares(tokenizer: Any, prompt: str, mass: np.ndarray) -> list[tuple[str, float]]:
    """Each word's share of the cross-attention the prompt's word tokens receive (start, end and padding
    tokens left out), highest first; `mass` is the attention per token position (77,)."""
    from cxrdiff.tokens import context_length, prompt_words

    limit = context_length(tokenizer) - 1
    try:
        words = prompt_words(tokenizer, prompt)
    except AssertionError:  # a prompt whose word-wise tokenisation differs: no attribution
        return []
    # a word without letters or digits keeps its own punctuation as its name ("___," → "___")
    spans = [(w.bare if any(c.isalnum() for c in w.bare) else w.bare.strip(".,;:!?()"), w.positions) for w in words]
    spans = [(bare or "?", [p for p in positions if p < limit]) for bare, positions in spans]
    total = sum(float(mass[p]) for _, ps in spans for p in ps)
    if total <= 0:
        return []
    shares: dict[str, float] = {}
    for bare, positions in spans:
        shares[bare] = shares.get(bare, 0.0) + sum(float(mass[p]) for p in positions) / total
    return sorted(shares.items(), key=lambda item: -item[1])


def score_prompts(comps: Any, prompts: Sequence[str], config: ReportConfig, device: Any) -> list[dict[str, Any]]:
    """Each prompt's memorization score (the mean over its --memorization-noise draws) and its words' shares of
    the conditional cross-attention over the same trajectory."""
    import torch
    from diffusers import DDIMScheduler

    from cxrdiff.attention import AttentionCapture
    from cxrdiff.metrics.privacy import memorization_score
    from cxrdiff.sample import image_seed
    from cxrdiff.text_encoders import encode_text

    scheduler = DDIMScheduler.from_config(comps.scheduler.config, clip_sample=False)
    uncond = encode_text(comps, [""], device)  # (1, tokens, dim)
    noise = config.memorization_noise
    latent_shape = comps.latent_shape
    per_batch = max(1, config.batch_size // noise)
    out = []
    for start in range(0, len(prompts), per_batch):
        chunk = list(prompts[start : start + per_batch])
        rows = [p for p in chunk for _ in range(noise)]
        latents = torch.stack(
            [
                torch.randn(
                    latent_shape, generator=torch.Generator().manual_seed(image_seed(config.seed, start + i, r))
                )
                for i in range(len(chunk))
                for r in range(noise)
            ]
        ).to(device)  # (rows, C, h, w)
        cond = encode_text(comps, rows, device)  # (rows, tokens, dim)
        with AttentionCapture(comps.unet, latent_shape[1:], drop_uncond=True) as capture:
            capture.active = True
            scores = memorization_score(
                comps.unet,
                latents,
                cond,
                uncond,
                scheduler,
                timesteps=config.memorization_steps,
                guidance_scale=config.guidance,
            )  # (rows,)
            mass = capture.maps().mean(dim=(2, 3)).cpu().numpy()  # (rows, tokens)
        for i, prompt in enumerate(chunk):
            rows_of = slice(i * noise, (i + 1) * noise)
            out.append(
                {
                    "prompt": prompt,
                    "score": float(scores[rows_of].mean()),
                    "words": [[w, round(s, 4)] for w, s in word_shares(comps.tokenizer, prompt, mass[rows_of].mean(0))],
                }
            )
    return out


def _summary(scored: list[dict[str, Any]]) -> dict[str, Any]:
    values = np.array([s["score"] for s in scored], dtype=np.float64)
    ranked = sorted(scored, key=lambda s: -s["score"])
    return {
        "n": len(scored),
        "mean": float(values.mean()) if len(values) else None,
        "std": float(values.std(ddof=1)) if len(values) > 1 else None,
        "prompts": [{**s, "words": s["words"][:TOP_WORDS]} for s in ranked],
    }


def word_attribution(scored: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The words that carry most of the summed score: each word's share of a prompt's attention times the
    prompt's score, summed over the prompts, as a share of the summed scores; with its prompt count."""
    total = sum(s["score"] for s in scored)
    carried: dict[str, list[float]] = {}
    for s in scored:
        for word, share in s["words"]:
            carried.setdefault(word, []).append(share * s["score"])
    ranked = sorted(carried.items(), key=lambda item: -sum(item[1]))[:TOP_WORDS]
    return [{"word": w, "share": sum(v) / total if total else 0.0, "prompts": len(v)} for w, v in ranked]


def memorization(config: ReportConfig, model: Path, real: Path, train: Any) -> dict[str, Any]:
    """Dutt et al.'s memorization score on `--memorization-prompts` training texts and as many held-out test
    prompts, with the words that carry it."""
    if config.memorization_prompts == 0:
        return {"skipped": "--memorization-prompts 0"}
    import torch

    from cxrdiff.models import load_components

    device = torch.device(config.device)
    comps = load_components(model, device=device)
    train_texts = training_texts(model, train, config.memorization_prompts, config.seed)
    test = read_table(real / "test.parquet")
    held = [str(t) for t in test["impression"] if str(t).strip()] if "impression" in test else []
    rng = np.random.default_rng(config.seed + 1)
    held = [held[i] for i in rng.permutation(len(held))[: config.memorization_prompts]]
    trained = score_prompts(comps, train_texts, config, device)
    held_out = score_prompts(comps, held, config, device)
    return {
        "steps": config.memorization_steps,
        "noise_per_prompt": config.memorization_noise,
        "guidance": config.guidance,
        "scheduler": "DDIM",
        "latent_elements": int(np.prod(comps.latent_shape)),
        "training": _summary(trained),
        "held_out": _summary(held_out),
        "words": word_attribution(trained),
    }


# --- tables ------------------------------------------------------------------------------------------


def _percent(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("rate") is None:
        return "—"
    label = f" ({entry['label']})" if entry.get("label") else ""
    return f"{100 * entry['rate']:.1f} [{100 * entry['low']:.1f}, {100 * entry['high']:.1f}]{label}"


def _cut(text: str) -> str:
    return text if len(text) <= PROMPT_CHARS else text[: PROMPT_CHARS - 1] + "…"


def _measured(metrics: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {n: r["privacy"] for n, r in metrics.get("runs", {}).items() if (r.get("privacy") or {}).get("copy_rate")}


def privacy_tables(metrics: Mapping[str, Any]) -> list[Table]:
    """The copy rates per run (beside the rate a model that copies nothing gives), the memorization score and
    the copy rate over training; none without privacy measures."""
    runs = _measured(metrics)
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


# --- figures -----------------------------------------------------------------------------------------


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=bounded_dpi(fig, 110), bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _grey(path: str, size: int | None = None) -> np.ndarray | None:
    """The image, in the square frame of `size` px when given (a training image as it was compared)."""
    from cxrdiff.images import load_grayscale, resize_center_crop

    if not Path(path).is_file():
        return None
    grey = load_grayscale(path)
    return grey if size is None or grey.shape == (size, size) else resize_center_crop(grey, size)


def pairs_figure(metrics: Mapping[str, Any]) -> tuple[bytes, str] | None:
    """Per run and measure, a row of the closest pairs: generated | nearest training image, their similarity
    above, red when it counts as a copy."""
    rows = []
    for name, p in _measured(metrics).items():
        for key, rate_key in (("features", "copy_rate"), ("pixels", "copy_rate_pixels")):
            pairs = (p.get("pairs") or {}).get(key)
            if pairs:
                rows.append((f"{name}\n{p[rate_key]['measure']}", pairs))
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(pairs) for _, pairs in rows)
    fig, axes = plt.subplots(len(rows), 2 * columns, figsize=(1.3 * 2 * columns, 1.6 * len(rows)), squeeze=False)
    for i, (label, pairs) in enumerate(rows):
        for j in range(columns):
            for side, key in ((0, "generated"), (1, "training")):
                ax = axes[i][2 * j + side]
                ax.set_xticks([])
                ax.set_yticks([])
                if j >= len(pairs):
                    ax.axis("off")
                    continue
                pair = pairs[j]
                generated = _grey(pair["generated"])
                grey = generated if side == 0 else _grey(pair[key], None if generated is None else generated.shape[0])
                if grey is not None:
                    ax.imshow(grey, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                colour = "red" if pair["copy"] else "black"
                for spine in ax.spines.values():
                    spine.set_color(colour)
                    spine.set_linewidth(2 if pair["copy"] else 0.5)
                if side == 0:
                    ax.set_title(
                        f"{pair['similarity']:.3f}" + (" copy" if pair["copy"] else ""),
                        fontsize=7,
                        color=colour,
                        loc="left",
                    )
                else:
                    ax.set_title("nearest training", fontsize=6, color="grey", loc="right")
        axes[i][0].set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    caption = (
        "The closest pairs of each run: generated image | its nearest training image (in the frame it was compared "
        "in), most similar first, per measure (features: cosine; pixels: Pearson correlation); red and marked 'copy' "
        "above the calibrated threshold."
    )
    return _png(fig), caption


def over_training_figure(metrics: Mapping[str, Any]) -> tuple[bytes, str] | None:
    """The copy rate against training steps (Wilson intervals) and against CNR along training, one line per run:
    the accuracy–interpretability–privacy front over training."""
    curves = {
        n: [p for p in r.get("checkpoints") or [] if p.get("copy_rate")] for n, r in metrics.get("runs", {}).items()
    }
    curves = {n: ps for n, ps in curves.items() if ps}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    nominal = None
    for name, points in curves.items():
        steps = [p["step"] for p in points]
        rates = np.array([100 * p["copy_rate"]["rate"] for p in points])
        low = rates - np.array([100 * p["copy_rate"]["low"] for p in points])
        high = np.array([100 * p["copy_rate"]["high"] for p in points]) - rates
        left.errorbar(steps, rates, yerr=[low, high], marker="o", capsize=3, label=name)
        nominal = 100 * points[0]["copy_rate"]["nominal"]
        cnr = [((p.get("grounding") or {}).get("cnr") or {}).get("mean") for p in points]
        if all(c is not None for c in cnr):
            right.plot(cnr, rates, marker="o", label=name)
            right.annotate(
                f"{steps[-1]:,}", (cnr[-1], rates[-1]), textcoords="offset points", xytext=(4, 4), fontsize=7
            )
    if nominal is not None:
        for ax in (left, right):
            ax.axhline(nominal, color="grey", linestyle=":", linewidth=1, label="no copying (nominal)")
    measure = next(iter(curves.values()))[0]["copy_rate"]["measure"]
    left.set(xlabel="training step", ylabel="copy rate %", title=f"privacy over training ({measure})")
    right.set(xlabel="CNR (average)", ylabel="copy rate %", title="interpretability against privacy")
    left.legend(fontsize=7)
    caption = (
        "Copy rate of each run's kept checkpoints against training steps (95 % Wilson intervals) and against their "
        "average CNR (the last step labelled): frozen and learnable text encoders on one figure; the dotted line is "
        "the rate a model that copies nothing gives."
    )
    return _png(fig), caption


def privacy_figures(metrics: Mapping[str, Any]) -> dict[str, tuple[bytes, str]]:
    """The privacy section's figures that have something to show (file stem → (PNG, caption))."""
    made = {"privacy-pairs": pairs_figure(metrics), "privacy-over-training": over_training_figure(metrics)}
    return {name: fig for name, fig in made.items() if fig is not None}
