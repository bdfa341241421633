"""Fidelity as today's benchmarks measure it: on each feature network (`report.features`), the Fréchet distance,
KID and precision / recall / density / coverage of a run's images against the real test images, overall and
per class, beside CheXGenBench's published FD (RadDino).

CheXGenBench (Dutt et al., arXiv 2505.10496) compares chest X-ray generators on RadDino features: FD, KID,
precision / recall / density / coverage with k = 5, overall and per pathology. Here the same metrics run on
every network the report is given (`--features`), named by the network ("FD (RadDino)"; "FID" and "KID" only
for InceptionV3), and per class wherever both the real and the generated images of the class number at least
`--min-class-images` (classes as the classifier check forms them: `--classifier-positives`). Measured once per
run and cached in `runs/<name>/benchmark.json` under the key of these settings and the folders' identities.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.artifacts import input_identity, settings_key
from cxrdiff.metrics.score import Score
from cxrdiff.report.config import ReportConfig
from cxrdiff.report.document import Table
from cxrdiff.report.features import (
    CACHE,
    FeatureNetwork,
    cached_features,
    feature_specs,
    load_network,
    spec_identity,
)
from cxrdiff.report.measure import classifier_key, label_groups
from cxrdiff.report.records import NetworkScores, ReportRecords, read_metrics
from cxrdiff.report.steps import cached, identity, image_path, image_size, read_table

NO_FINDING = "No Finding"
# CheXGenBench's leaderboard (README of Raman1121/CheXGenBench; arXiv 2505.10496): FD on RadDino features of
# MIMIC-CXR test images, lower is better. Its SD V2 is the paper's SDv2 base model.
PUBLISHED_RADDINO_FD = {"Sana 0.6B (best)": 54.23, "SD V2-1": 186.53, "SD V2": 194.72}
CHEXGENBENCH = "CheXGenBench (Dutt et al., arXiv 2505.10496)"
NO_NETWORK = "no feature network (--features, --fid, --fid-xrv or a classifier with features)"
DIGITS = {"FD": 1, "KID": 4, "precision": 3, "recall": 3, "density": 3, "coverage": 3}


def benchmark_settings(config: ReportConfig, classifier: Any = None) -> dict[str, Any]:
    """What decides the benchmark's numbers besides the folders measured."""
    networks = [spec_identity(s) for s in feature_specs(config, classifier)]
    keys = ("n_fid", "min_class_images", "kid_subsets", "kid_subset_size", "prdc_k", "classifier_positives", "seed")
    return {"networks": networks, **{k: getattr(config, k) for k in keys}}


def network_scores(
    network: FeatureNetwork, real: np.ndarray, fake: np.ndarray, config: ReportConfig
) -> list[dict[str, Any]]:
    """FD, KID and precision / recall / density / coverage of one pair of feature sets, each a `Score` dict
    (labelled when the network is untrained); PRDC is left out, with the reason, when a set is not larger
    than k."""
    from cxrdiff.metrics.distribution import kid, kid_interval, prdc
    from cxrdiff.metrics.fid import feature_statistics, frechet_distance

    n = [len(real), len(fake)]
    common = {"label": network.label, "protocol": {**network.protocol, "n": n}}
    fd = frechet_distance(feature_statistics(real), feature_statistics(fake))
    k = kid(real, fake, subsets=config.kid_subsets, subset_size=config.kid_subset_size, seed=config.seed)
    whole = k.subset_size >= max(n)  # every subset is both whole sets: its std over subsets is exactly 0
    scores = [
        Score(network.metric_name("FD"), fd, **common),
        Score(
            network.metric_name("KID"),
            k.mean,
            std=None if whole else k.std,
            label=network.label,
            protocol={**common["protocol"], "subsets": k.subsets, "subset_size": k.subset_size, "kernel": "cubic"},
            interval=kid_interval(real, fake, resamples=config.fd_resamples, seed=config.seed).as_dict()
            if whole and config.fd_resamples
            else None,
        ),
    ]
    if min(n) > config.prdc_k:
        manifold = prdc(real, fake, k=config.prdc_k)
        for metric in ("precision", "recall", "density", "coverage"):
            protocol = {**common["protocol"], "k": manifold.k}
            scores.append(
                Score(network.metric_name(metric), getattr(manifold, metric), network.label, protocol=protocol)
            )
    return [s.as_dict() for s in scores]


def class_indices(table: Any, paths: Sequence[Path], rule: str) -> dict[str, list[int]]:
    """Per class (the MS-CXR classes and No Finding): the row indices of its images, by the classifier
    check's rule (`measure.label_groups`)."""
    by_class, no_finding = label_groups(table, list(paths), rule)
    where = {p: i for i, p in enumerate(paths)}
    groups = {c: [where[p] for p in ps] for c, ps in by_class.items()}
    groups[NO_FINDING] = [where[p] for p in no_finding]
    return groups


def measure_benchmark(config: ReportConfig, samples: Path, real: Path, classifier: Any = None) -> dict[str, Any]:
    """The benchmark of one sample folder against the real test images (`--n-fid` of them): per network its
    scores, and per class the same where both sides have `--min-class-images` images."""
    specs = feature_specs(config, classifier)
    if not specs:
        return {"skipped": NO_NETWORK}
    table = read_table(samples / "samples.parquet")
    fake = [samples / f for f in table["file"]]
    size = image_size(fake[0])
    test = read_table(real / "test.parquet").head(config.n_fid)
    real_paths = [image_path(p, real) for p in test["image_path"]]
    cache = Path(config.out) / CACHE
    fake_classes = class_indices(table, fake, config.classifier_positives)
    real_classes = class_indices(test, real_paths, config.classifier_positives)
    overall: list[dict[str, Any]] = []
    per_class: dict[str, dict[str, Any]] = {
        c: {"n_real": len(real_classes.get(c, [])), "n_generated": len(fake_classes.get(c, [])), "networks": []}
        for c in dict.fromkeys([*real_classes, *fake_classes])
    }
    for spec in specs:
        network = load_network(spec, config, classifier)
        real_features = cached_features(network, real_paths, size, f"test:{input_identity(real)}", cache)
        fake_features = cached_features(network, fake, size, f"samples:{input_identity(samples)}", cache)
        overall.append(
            {"network": network.name, "scores": network_scores(network, real_features, fake_features, config)}
        )
        for c, entry in per_class.items():
            if min(entry["n_real"], entry["n_generated"]) < config.min_class_images:
                continue
            scores = network_scores(network, real_features[real_classes[c]], fake_features[fake_classes[c]], config)
            entry["networks"].append({"network": network.name, "scores": scores})
    for entry in per_class.values():
        if not entry["networks"]:
            entry["skipped"] = f"fewer than {config.min_class_images} images on a side"
    return {
        "networks": overall,
        "per_class": per_class,
        "min_class_images": config.min_class_images,
        "classes": config.classifier_positives,
        "n": [len(real_paths), len(fake)],
    }


def measure_benchmark_once(
    config: ReportConfig, folder: Path, samples: Path, real: Path, classifier: Any, done: list[str]
) -> dict[str, Any]:
    """`measure_benchmark`, cached in `folder/benchmark.json` under the key of its settings, the classifier
    and the folders' identities; "benchmark" joins `done` when measured now (not when there is no network)."""
    if not feature_specs(config, classifier):
        return {"skipped": NO_NETWORK}
    key = settings_key(
        {
            **benchmark_settings(config, classifier),
            "classifier": classifier_key(config, classifier),
            "weights": {"inception": identity(config.inception_weights), "xrv": identity(config.xrv_weights)},
            "random_features": config.random_features,
            "samples": input_identity(samples),
            "real": input_identity(real),
        }
    )
    measured, fresh = cached(
        folder / "benchmark.json", key, lambda: measure_benchmark(config, samples, real, classifier)
    )
    if fresh:
        done.append("benchmark")
    return measured


# --- tables -------------------------------------------------------------------------------------


def _cell(scores: Mapping[str, Score], metric: str, network: str, fid_family: bool) -> str:
    name = ("FID" if metric == "FD" else "KID") if fid_family and metric in ("FD", "KID") else f"{metric} ({network})"
    entry = scores.get(name)
    if not entry:
        return "—"
    places = digits(entry.value, DIGITS[metric]) if metric in ("FD", "KID") else DIGITS[metric]
    return entry.text(places)


def digits(value: float | None, base: int) -> int:
    """`base` decimals, more for a value below 1 so that it keeps its leading digits (an FD of 0.004 on small
    features is not 0.0), at most 6."""
    if not value or not math.isfinite(value) or abs(value) >= 1:
        return base
    return min(6, base + max(0, -math.floor(math.log10(abs(value)))))


def _rows(name: str, source: str, networks: Sequence[NetworkScores]) -> list[list[str]]:
    rows = []
    for item in networks:
        fid_family = "FID" in item.scores
        cells = [_cell(item.scores, m, item.network, fid_family) for m in DIGITS]
        rows.append([name, source, item.network, *cells])
    return rows


HEADERS = ["model", "source", "network", "FD", "KID", "precision", "recall", "density", "coverage"]


def benchmark_tables(metrics: Mapping[str, Any] | ReportRecords) -> list[Table]:
    """The overall table (CheXGenBench's published FD (RadDino) beside every run) and the per-class table; none
    when no run has a benchmark."""
    runs = {n: r.benchmark for n, r in read_metrics(metrics).runs.items() if r.benchmark}
    if not runs:
        return []
    rows = [
        [model, f"published, {CHEXGENBENCH}", "RadDino", f"{value:g}"] + ["—"] * 5
        for model, value in PUBLISHED_RADDINO_FD.items()
    ]
    for name, bench in runs.items():
        rows += _rows(name, "this report", bench.networks)
    k = next((s.protocol["k"] for b in runs.values() for n in b.networks for s in n.scores.values()
              if s.protocol.get("k")), 5)  # fmt: skip
    n_real, n_fake = next(iter(runs.values())).n
    overall = Table(
        "Fidelity on feature networks: FD, KID and precision / recall / density / coverage",
        HEADERS,
        rows,
        f"Published: the FD (RadDino) leaderboard of {CHEXGENBENCH}, on the MIMIC-CXR test set at 512 px: compare "
        "a row here with it only when the network is RadDino (`--features hf:RadDino=DIR`) and the images are MIMIC's. "
        f"Measured: {n_real} real test images against {n_fake} generated. FD at this n sits above the FD at 5,000 "
        "images by O(dimension / n): compare FDs at equal n only. KID (torch-fidelity, cubic kernel): ± its std over "
        "subsets when the sets are larger than a subset, else [95% bootstrap interval over the generated images, "
        f"real set fixed]; precision / recall / density / coverage with k = {k} (Naeem et al. 2020): single values, "
        "no interval. FID and KID name InceptionV3 only; every other distance names its network.",
    )
    tables = [overall]
    class_rows = []
    minimum = None
    for name, bench in runs.items():
        minimum = bench.min_class_images if bench.min_class_images is not None else minimum
        for c, entry in bench.per_class.items():
            if not entry.n_real and not entry.n_generated:
                continue
            counts = f"{entry.n_real} / {entry.n_generated}"
            if not entry.networks:
                class_rows.append([name, c, counts, "—", "too few images"] + ["—"] * 5)
                continue
            for row in _rows(name, counts, entry.networks):
                class_rows.append([row[0], c, *row[1:]])
    if class_rows:
        tables.append(
            Table(
                "Fidelity per class on feature networks: FD, KID and precision / recall / density / coverage",
                ["model", "class", "real / generated images", *HEADERS[2:]],
                class_rows,
                f"A class is measured when both sides have at least {minimum} images (--min-class-images); its images "
                "as the classifier check forms them (--classifier-positives). No published per-class numbers are "
                "shown: CheXGenBench's conditional analysis uses its own prompts and pathology sets.",
            )
        )
    return tables
