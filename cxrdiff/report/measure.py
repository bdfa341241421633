"""Fidelity of a run's images against the real test images: Fréchet distances, MS-SSIM diversity and the
classifier check, cached beside the sample folders under the key of the metric settings and of the folders'
identities (a changed key measures again).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.artifacts import (
    input_identity,
    settings_key,
)
from cxrdiff.data import MS_CXR_CATEGORIES
from cxrdiff.metrics.score import Score
from cxrdiff.report.config import ReportConfig, Steps
from cxrdiff.report.steps import cached, identity, image_path, image_size, read_table, sample_folders


def classifier_key(config: ReportConfig, classifier: Any = None) -> str | None:
    """The classifier's identity for the caches, without loading it: a given classifier's name and
    `cache_key` (without one, its object id: measured afresh every run), else torchxrayvision's weights."""
    if classifier is not None:
        name = getattr(classifier, "name", type(classifier).__name__)
        return f"{name}:{getattr(classifier, 'cache_key', id(classifier))}"
    path = xrv_path(config)
    if path is None:
        return None
    from cxrdiff.metrics.classifier import XrvClassifier

    return f"{XrvClassifier.name}:{input_identity(path)}"


def xrv_path(config: ReportConfig) -> Path | None:
    """The torchxrayvision weights the classifier check uses, or None (random features only: a random
    classifier's AUC means nothing, so it is not run)."""
    if not config.fid_xrv:
        return None
    from cxrdiff.metrics.fid import default_xrv_path, resolve_weights

    if config.xrv_weights is None and not default_xrv_path().is_file():
        return None
    return Path(resolve_weights(config.xrv_weights, "xrv"))


def load_classifier(config: ReportConfig) -> Any:
    path = xrv_path(config)
    if path is None:
        return None
    from cxrdiff.metrics.classifier import XrvClassifier

    return XrvClassifier(path, device=config.device)


def label_groups(frame: Any, paths: list[Path], rule: str = "only") -> tuple[dict[str, list[Path]], list[Path]]:
    """Images per class and the 'No Finding' images, from a table's CheXpert columns (1.0 = positive).

    `only` (the paper's reference protocol): an image counts for d when d is its only positive label, and
    as No Finding when that is its only one. `any`: every image with d = 1.0, every one with No Finding."""
    from cxrdiff.data import LABELS

    labels = [c for c in LABELS if c in frame]
    positive = (frame[labels] == 1.0).to_numpy() if labels else np.zeros((len(paths), 0), bool)  # (n, labels)
    alone = positive.sum(axis=1) == 1 if rule == "only" else np.ones(len(paths), bool)  # (n,)

    def chosen(column: str) -> list[Path]:
        hit = positive[:, labels.index(column)] & alone
        return [p for p, keep in zip(paths, hit, strict=True) if keep]

    by_class = {c: chosen(c) for c in MS_CXR_CATEGORIES if c in labels}
    return by_class, chosen("No Finding") if "No Finding" in labels else []


def grey_images(paths: Sequence[Path], size: int) -> np.ndarray:
    from cxrdiff.images import load_grayscale, resize_center_crop

    out = []
    for p in paths:
        img = load_grayscale(p)
        out.append(img if img.shape == (size, size) else resize_center_crop(img, size))
    return np.stack(out) if out else np.zeros((0, size, size), np.uint8)


def scores_as_dicts(table: Mapping[str, Score]) -> dict[str, Any]:
    return {k: v.as_dict() for k, v in table.items()}


def features_file(keep: Path, name: str) -> Path:
    """Where the real and generated features behind a Fréchet distance are kept (for comparing two runs)."""
    return keep / (re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() + ".npz")


def fidelity_sets(config: ReportConfig, samples: Path, real: Path) -> tuple[list[Path], list[Path], int, dict]:
    """A sample folder's images, as many real test images (at most --n-fid: a Fréchet distance depends on the
    counts), their size, and what every Fréchet distance takes besides (caches, device, the bootstrap)."""
    table = read_table(samples / "samples.parquet")
    fake = [samples / f for f in table["file"]]
    size = image_size(fake[0])
    test = read_table(real / "test.parquet").head(min(config.n_fid, len(fake)))
    real_paths = [image_path(p, real) for p in test["image_path"]]
    kwargs = dict(random_features=config.random_features, size=size, cache_root=Path(config.out) / ".fidelity_cache",
                  device=config.device, resamples=config.fd_resamples, seed=config.seed)  # fmt: skip
    return fake, real_paths, size, kwargs


def measure_run(
    config: ReportConfig, samples: Path, diversity_dir: Path, real: Path, classifier: Any, keep: Path | None = None
) -> dict[str, Any]:
    """Fidelity of one run: Fréchet distances, MS-SSIM, classifier AUC; each a `Score` as a dict, with its
    bootstrap interval. The real set has as many images as were generated (FD depends on the counts), at
    most --n-fid. `keep`: a folder for the Fréchet distances' features (see `features_file`)."""
    from cxrdiff.metrics import diversity, fid

    table = read_table(samples / "samples.parquet")
    fake, real_paths, size, kwargs = fidelity_sets(config, samples, real)
    boot = dict(resamples=config.fd_resamples, seed=config.seed)

    def kept(name: str) -> Path | None:
        return None if keep is None else features_file(keep, name)

    fidelity: list[Score] = []
    if config.fid:
        fidelity.append(
            fid.fid(real_paths, fake, weights=config.inception_weights, keep_features=kept("fid"), **kwargs)
        )
    if config.fid_xrv:
        fidelity.append(
            fid.fid_xrv(real_paths, fake, weights=config.xrv_weights, keep_features=kept("fid-xrv"), **kwargs)
        )
    if classifier is not None and hasattr(classifier, "features"):
        name = f"FD ({classifier.name} features)"
        score = fid.fd_features(
            real_paths, fake, classifier.features, name, size=size, keep_features=kept(name), **boot
        )
        fidelity.append(score)
    div_table = read_table(diversity_dir / "samples.parquet")
    groups = [
        [diversity_dir / f for f in g.sort_values("repeat")["file"]] for _, g in div_table.groupby("prompt_index")
    ]
    result: dict[str, Any] = {
        "fidelity": [s.as_dict() for s in fidelity],
        "diversity": diversity.diversity(groups, seed=config.seed, resamples=config.resamples).as_dict(),
        "image_size": size,
        "n_generated": len(fake),
        "n_real": len(real_paths),
    }
    if classifier is not None and not config.classifier_prompts_per_class:  # else: on its own prompt set
        result.update(classifier_on_images(config, table, fake, size, classifier))
    return result


def classifier_on_images(
    config: ReportConfig, table: Any, paths: list[Path], size: int, classifier: Any
) -> dict[str, Any]:
    """{"classifier": AUC per class} on images labelled by `table`'s CheXpert columns (by
    --classifier-positives); {} without a No-Finding image to compare against."""
    from cxrdiff.metrics import classifier as clf

    by_class, no_finding = label_groups(table, paths, config.classifier_positives)
    if not no_finding:
        return {}
    aucs = clf.classifier_check(
        classifier, {c: grey_images(p, size) for c, p in by_class.items()}, grey_images(no_finding, size),
        seed=config.seed, resamples=config.resamples,
    )  # fmt: skip
    return {"classifier": scores_as_dicts(aucs)}


def measure_real(config: ReportConfig, real: Path, classifier: Any, size: int) -> dict[str, Any]:
    """The reference row: the classifier check on the real p19 test images."""
    if classifier is None:
        return {}
    test = read_table(real / "test.parquet").head(config.n_fid)
    return classifier_on_images(config, test, [image_path(p, real) for p in test["image_path"]], size, classifier)


def metric_settings(config: ReportConfig, classifier: str | None) -> dict[str, Any]:
    """What decides the measured numbers besides the folders measured (they join per cache)."""
    return {
        **{
            k: getattr(config, k)
            for k in (
                "n_fid",
                "random_features",
                "fid",
                "fid_xrv",
                "diversity_prompts",
                "classifier_positives",
                "classifier_prompts_per_class",
                "seed",
                "resamples",
                "fd_resamples",
            )  # fmt: skip
        },
        "classifier": classifier,
        "weights": {"inception": identity(config.inception_weights), "xrv": identity(config.xrv_weights)},
    }


def measured_once(
    config: ReportConfig, path: Path, metric: dict, samples: Path, diversity: Path, real: Path, classifier: Any
) -> tuple[dict[str, Any], bool]:
    """Fidelity and diversity of one sample set, cached in `path` under the key of the metric settings and
    the folders' identities (a changed key measures again); whether it was measured now."""
    key = settings_key(
        {
            **metric,
            "samples": input_identity(samples),
            "diversity": input_identity(diversity),
            "real": input_identity(real),
        }
    )
    keep = path.parent / ("features" + path.stem.removeprefix("metrics"))  # features/, features-ms-cxr/
    return cached(path, key, lambda: measure_run(config, samples, diversity, real, classifier, keep))


def measure_ms_cxr(
    config: ReportConfig, run: Path, folder: Path, real: Path, steps: Steps, classifier: Any, metric: dict
) -> tuple[dict[str, Any], list[str]]:
    """Fidelity and diversity of the MS-CXR-phrase images (cached in metrics-ms-cxr.json under its own key,
    so adding this column never measures the p19 one again); the keys renamed `*_ms_cxr`."""
    done: list[str] = []
    samples, diversity = sample_folders(config, run, folder, real, steps, done, prompts="ms-cxr")
    measured, fresh = measured_once(
        config, folder / "metrics-ms-cxr.json", metric, samples, diversity, real, classifier
    )
    if fresh:
        done.append("metrics-ms-cxr")
    return {
        "fidelity_ms_cxr": measured.get("fidelity", []),
        "diversity_ms_cxr": measured.get("diversity"),
        "n_generated_ms_cxr": measured.get("n_generated"),
    }, done
