"""The classifier check: does a pathology classifier see class d in images generated from d-prompts?

For each class d: AUC (scikit-learn) of the classifier's score for d on images of d against images of
"No Finding"; the same on real images is the reference row. The classifier is torchxrayvision's
DenseNet121 from a local file, or anything with `classes` and `scores(images)`: the demo trains the
small CNN below on phantom images, since no X-ray classifier weights can ship with it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cxrdiff.data import MS_CXR_CATEGORIES
from cxrdiff.errors import InputError
from cxrdiff.metrics.intervals import MIN_POSITIVES, RESAMPLES, Interval
from cxrdiff.metrics.score import Score

NO_FINDING = "No Finding"
PHANTOM_CLASSES: tuple[str, ...] = (*MS_CXR_CATEGORIES, NO_FINDING)
ALIASES = {"Pleural Effusion": ("Effusion",)}  # torchxrayvision's name for it


class Classifier(Protocol):
    """What the check needs: class names and per-class scores (any monotone scale) for uint8 (N, H, W)."""

    name: str
    classes: Sequence[str]

    def scores(self, images: np.ndarray) -> np.ndarray:  # (N, len(classes))
        ...


def class_index(classes: Sequence[str], name: str) -> int | None:
    """Where `name` (a CheXpert/MS-CXR class) sits among a classifier's classes, aliases included."""
    for candidate in (name, *ALIASES.get(name, ())):
        if candidate in classes:
            return list(classes).index(candidate)
    return None


def _images(images: Any) -> np.ndarray:
    if isinstance(images, np.ndarray):
        return images.astype(np.uint8, copy=False)
    from cxrdiff.images import load_grayscale

    return np.stack([load_grayscale(p) for p in images]) if len(images) else np.zeros((0, 1, 1), np.uint8)


def class_aucs(
    scores_pos: Mapping[str, np.ndarray],
    scores_neg: Mapping[str, np.ndarray],
    name: str = "classifier AUC",
    seed: int = 0,
    resamples: int = RESAMPLES,
) -> dict[str, Score]:
    """Per class d: AUC (%) of score_d on d-images (positives) vs No-Finding images; plus "Average". Each with
    a bootstrap interval over the images: positives and negatives resampled separately (each keeps its
    count), the negatives once per resample for every class, as they are the same No-Finding images.

    `scores_pos[d]` / `scores_neg[d]`: the classifier's score for d on the d-images / No-Finding images.
    A class with fewer than MIN_POSITIVES positives keeps its AUC in metrics.json, but tables show
    "too few (n)" (`metrics.intervals.classifier_auc_cell`) and it stays out of the Average. Each score's
    protocol names what it rests on: positives and negatives (the Average: its classes, their positives summed).
    """
    rng = np.random.default_rng(seed)
    out: dict[str, Score] = {}
    usable: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for cls, pos in scores_pos.items():
        pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(scores_neg[cls], dtype=np.float64)
        counts = {"positives": len(pos), "negatives": len(neg)}
        if len(pos) == 0 or len(neg) == 0:
            out[cls] = Score(name, float("nan"), protocol=counts)
            continue
        out[cls] = Score(name, 100.0 * _auc(pos, neg), unit="%", protocol=counts)
        if len(pos) >= MIN_POSITIVES:
            usable[cls] = (pos, neg)
    n_neg = len(next(iter(usable.values()))[1]) if usable else 0
    neg_rows = rng.integers(0, max(n_neg, 1), size=(resamples, n_neg))
    draws: dict[str, np.ndarray] = {}
    for cls, (pos, neg) in usable.items():
        pos_rows = rng.integers(0, len(pos), size=(resamples, len(pos)))
        draws[cls] = np.array([100.0 * _auc(pos[p], neg[q]) for p, q in zip(pos_rows, neg_rows, strict=True)])
        out[cls] = _bounded(out[cls], draws[cls], seed, resamples)
    if usable:
        value = float(np.mean([out[c].value for c in usable]))
        counts = {"classes": len(usable), "positives": sum(len(p) for p, _ in usable.values()), "negatives": n_neg}
        out["Average"] = _bounded(Score(name, value, unit="%", protocol=counts),
                                  np.mean(list(draws.values()), axis=0), seed, resamples)  # fmt: skip
    return out


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC of positives over negatives by the rank-sum identity (ties count half), as `roc_auc_score`."""
    from scipy.stats import rankdata

    ranks = rankdata(np.r_[pos, neg])
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0) / (len(pos) * len(neg)))


def _bounded(score: Score, draws: np.ndarray, seed: int, resamples: int) -> Score:
    low, high = np.percentile(draws, [2.5, 97.5])
    method = f"bootstrap over images, positives and negatives resampled separately, {resamples} resamples, percentile"
    interval = Interval(score.value, float(low), float(high), method=method, seed=seed, resamples=resamples,
                        n=(score.protocol.get("positives", 0), score.protocol.get("negatives", 0)))  # fmt: skip
    return dataclasses.replace(score, interval=interval.as_dict())


def classifier_check(
    classifier: Classifier,
    by_class: Mapping[str, Any],
    no_finding: Any,
    classes: Sequence[str] = MS_CXR_CATEGORIES,
    seed: int = 0,
    resamples: int = RESAMPLES,
) -> dict[str, Score]:
    """Run `classifier` on each class's images and the No-Finding images; AUC per class (see `class_aucs`).

    `by_class[d]`: images (paths or uint8 (n, H, W)) made from (or labelled with) class d.
    """
    neg_images = _images(no_finding)
    if len(neg_images) == 0:
        raise InputError("classifier check: no 'No Finding' images to compare against")
    neg_scores = classifier.scores(neg_images) if len(neg_images) else None  # (n_neg, n_classes)
    pos, neg = {}, {}
    for cls in classes:
        idx = class_index(classifier.classes, cls)
        if idx is None:
            continue
        imgs = _images(by_class.get(cls, []))
        pos[cls] = classifier.scores(imgs)[:, idx] if len(imgs) else np.zeros(0)
        neg[cls] = neg_scores[:, idx]
    return class_aucs(pos, neg, name=f"AUC ({classifier.name})", seed=seed, resamples=resamples)


# --- torchxrayvision's classifier ------------------------------------------------------------


class XrvClassifier:
    """torchxrayvision DenseNet121 `densenet121-res224-all` on our preprocessing (grey, 224 px, ±1024).

    Scores are the raw logits: AUC only needs their order, and the library's operating-point
    normalisation is monotone per class.
    """

    name = "torchxrayvision densenet121-res224-all"

    def __init__(self, weights: str | os.PathLike | None, device: str = "cpu", batch_size: int = 32):
        from cxrdiff.metrics.fid import load_xrv_densenet, resolve_weights

        path = resolve_weights(weights, "xrv")
        self.model = load_xrv_densenet(path).to(device)
        self.classes = tuple(self.model.pathologies)
        self.device, self.batch_size = device, batch_size

    def scores(self, images: np.ndarray) -> np.ndarray:
        import torch

        from cxrdiff.metrics.fid import xrv_preprocess

        out = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(images[start : start + self.batch_size]))[:, None]
                out.append(self.model(xrv_preprocess(batch).to(self.device)).float().cpu().numpy())  # (b, 18)
        return np.concatenate(out)


# --- a small classifier for phantom images -----------------------------------------------------


def _phantom_net(n_classes: int, width: int, pool: str):
    import torch.nn as nn

    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(4, cout), nn.SiLU())

    body = nn.Sequential(
        block(1, width), block(width, width * 2), block(width * 2, width * 4), block(width * 4, width * 4)
    )
    return body, nn.Linear(width * 4 * len(POOLS[pool]), n_classes)


POOLS = {"mean": ("mean",), "mean-max": ("mean", "max")}  # global pooling of the last feature map


class PhantomClassifier:
    """A small multi-label CNN (4 strided convs, global pool, linear) for phantom X-rays.

    `features(x)` is the pooled penultimate layer: the demo's feature network for a Fréchet distance
    that it names "FD (phantom classifier features)". `pool="mean-max"` concatenates the global mean and
    max of the last feature map: a small lesion moves the max more than the mean of a 4 × 4 map.
    """

    name = "phantom classifier"

    def __init__(self, classes: Sequence[str] = PHANTOM_CLASSES, size: int = 64, width: int = 16, pool: str = "mean"):
        import torch

        if pool not in POOLS:
            raise InputError(f"phantom classifier: pool {pool!r} is not one of {', '.join(POOLS)}")
        self.classes, self.size, self.width, self.pool = tuple(classes), int(size), int(width), pool
        self.body, self.head = _phantom_net(len(self.classes), self.width, pool)
        self.modules = torch.nn.ModuleList([self.body, self.head])

    def _input(self, x: Any):
        import torch
        import torch.nn.functional as F

        x = torch.as_tensor(x)
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        if x.dim() == 3:
            x = x[:, None]  # (batch, 1, height, width)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        return x * 2.0 - 1.0  # (batch, 1, size, size) in [-1, 1]

    def features(self, x: Any):
        """Float (B, 1, H, W) in [0, 1] or uint8 (B, H, W) → (B, 4 × width × pools)."""
        import torch

        maps = self.body(self._input(x))  # (batch, 4 * width, h, w)
        pooled = [maps.mean(dim=(2, 3)) if p == "mean" else maps.amax(dim=(2, 3)) for p in POOLS[self.pool]]
        return torch.cat(pooled, dim=1)  # (batch, 4 * width * pools)

    def logits(self, x: Any):
        return self.head(self.features(x))  # (batch, classes)

    def scores(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        import torch

        self.modules.eval()
        with torch.no_grad():
            out = [self.logits(images[s : s + batch_size]).numpy() for s in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    @property
    def cache_key(self) -> str:
        """A hash of the weights: the report reuses cached metrics only for the same classifier."""
        import hashlib

        digest = hashlib.sha256(repr(self.classes).encode())
        for name, tensor in sorted(self.modules.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
        return digest.hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Weights as safetensors; classes and sizes in its metadata."""
        import json

        from safetensors.torch import save

        from cxrdiff.artifacts import write_bytes

        state = {k: v.detach().contiguous() for k, v in self.modules.state_dict().items()}
        meta = {
            "classes": json.dumps(list(self.classes)),
            "size": str(self.size),
            "width": str(self.width),
            "pool": self.pool,
        }
        return write_bytes(path, save(state, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> PhantomClassifier:
        import json

        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
            model = cls(json.loads(meta["classes"]), int(meta["size"]), int(meta["width"]), meta.get("pool", "mean"))
            model.modules.load_state_dict(load_file(str(path)))
        except FileNotFoundError:
            raise InputError(f"{path}: classifier file not found") from None
        except (KeyError, RuntimeError, OSError, ValueError, SafetensorError) as exc:
            raise InputError(f"{path}: not a phantom classifier file ({exc})") from None
        model.modules.eval()
        return model


def loss_targets(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CheXpert-style labels → (targets, weights) for the loss: 1 → (1, 1); 0 and blank → (0, 1); -1 → (0, 0)."""
    labels = np.asarray(labels, dtype=np.float32)
    targets = np.where(labels == 1.0, 1.0, 0.0).astype(np.float32)
    return targets, (labels != -1.0).astype(np.float32)  # NaN != -1: a blank is a negative


def train_phantom_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str] = PHANTOM_CLASSES,
    epochs: int = 30,
    batch_size: int = 32,
    lr: float = 3e-3,
    width: int = 16,
    seed: int = 0,
    size: int | None = None,
    pool: str = "mean-max",
    flips: bool = True,
) -> PhantomClassifier:
    """Train `PhantomClassifier` on uint8 (N, H, W) images and (N, classes) CheXpert-style labels.

    Labels: 1 positive; 0 or blank (NaN) negative, since CheXpert leaves a finding the report does not
    mention blank, so a "No Finding" image is a negative for every finding; -1 (uncertain) is left out of
    the loss. Seeded (same inputs, same weights); AdamW, BCE with logits; `flips` mirrors a random half
    of each batch (the labels name findings, not sides). The defaults were chosen on a validation split
    of the demo's training patients (docs/method.md, "The demo's phantom classifier"); about 20 s for 460
    64-px images on 2 shared CPU cores.
    """
    import torch

    from cxrdiff.console import progress

    images = np.asarray(images, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.float32)
    if images.ndim != 3 or labels.shape != (len(images), len(classes)):
        raise InputError(
            f"train_phantom_classifier: images {images.shape} and labels {labels.shape} do not match "
            f"(N, H, W) and (N, {len(classes)})"
        )
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = PhantomClassifier(classes, size or images.shape[-1], width, pool)
    x = torch.from_numpy(images)  # (n, height, width) uint8
    y, known = (torch.from_numpy(a) for a in loss_targets(labels))  # (n, classes) each
    optimizer = torch.optim.AdamW(model.modules.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="none")
    model.modules.train()
    for _ in progress(range(epochs), total=epochs, description="phantom classifier"):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            batch = x[idx]  # (b, height, width)
            if flips:
                mirror = torch.rand(len(idx), generator=generator) < 0.5
                batch = torch.where(mirror[:, None, None], batch.flip(-1), batch)
            loss = (loss_fn(model.logits(batch), y[idx]) * known[idx]).sum() / known[idx].sum().clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.modules.eval()
    return model
