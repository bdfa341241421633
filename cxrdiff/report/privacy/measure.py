"""The copy search of the privacy section: each generated image's nearest training image (features and pixels),
the copy threshold calibrated on held-out images and the copy rate, per run and over its checkpoints."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.artifacts import MANIFEST, input_identity, settings_key
from cxrdiff.console import log
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
from cxrdiff.report.features import (
    CACHE,
    cached_features,
    cached_pixels,
    load_network,
    privacy_spec,
    spec_identity,
)
from cxrdiff.report.measure import classifier_key
from cxrdiff.report.privacy.memorization import memorization
from cxrdiff.report.steps import cached, identity, image_path, image_size, read_table

TRAIN_CHUNK = 20_000  # training rows per block of the search (bounds the float copy of the training set)


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
