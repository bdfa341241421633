"""Distribution fidelity beyond the Fréchet distance: KID and precision / recall / density / coverage on
feature vectors, and a feature network for any local Hugging Face vision model (RadDino, DINOv2, ViT).

A module of its own rather than more of `fid.py`: these metrics take feature vectors, not image sets, so
they share no code with the torch-fidelity image pipeline there beyond the KID estimator; `fid.py` keeps
the Fréchet family and its cached extractors. Features come from `HfVisionFeatures` (or any (N, D) array).

What the published benchmark (CheXGenBench, `metrics/fid.py`) reports, and how these match it:
  - KID: the unbiased MMD² with the cubic polynomial kernel (x·y / D + 1)³, averaged over 100 random
    subsets; theirs is torchmetrics', ours torch-fidelity's (the same estimator and kernel; the random
    subsets differ). Their subset size is min(#real, #generated); ours is `subset_size` clipped to that.
  - precision, recall, density, coverage with k = 5 (Naeem et al. 2020), as the `prdc` package
    computes them: Euclidean distances, a point's radius is the distance to its k-th nearest neighbour
    in its own set (itself excluded), and "inside a ball" is a strict <.
  - RadDino features: their `pooler_output`, which for a DINOv2 model is the CLS token of the (layer-
    normed) `last_hidden_state`, i.e. exactly what `HfVisionFeatures` takes for DINOv2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cxrdiff.errors import InputError

PRDC_CHUNK = 1024  # generated rows per block of the real × generated distance matrix


def _features(array: Any, what: str) -> np.ndarray:
    features = np.asarray(array.detach().cpu() if hasattr(array, "detach") else array, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise InputError(f"{what}: need at least 2 feature vectors of shape (N, D), got {features.shape}")
    if not np.isfinite(features).all():
        raise InputError(f"{what}: features contain NaN or inf")
    return features


def _pair(real: Any, fake: Any) -> tuple[np.ndarray, np.ndarray]:
    real, fake = _features(real, "real features"), _features(fake, "generated features")
    if real.shape[1] != fake.shape[1]:
        raise InputError(f"real and generated features differ in dimension: {real.shape[1]} vs {fake.shape[1]}")
    return real, fake


# --- KID -------------------------------------------------------------------------------------


class Kid(NamedTuple):
    """KID mean and standard deviation over `subsets` random subsets of `subset_size` per side."""

    mean: float
    std: float
    subset_size: int
    subsets: int


def kid(
    real_features: Any,
    fake_features: Any,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    seed: int = 0,
) -> Kid:
    """Kernel Inception Distance on given features, computed by torch-fidelity (`kid_features_to_metric`).

    Kernel (x·y / D + 1)^degree; each subset draws `subset_size` rows from each side without replacement
    and takes the unbiased MMD²; mean and (population) std over the subsets. `subset_size` is clipped to
    the smaller set (torch-fidelity refuses a larger one), and the size used is returned. Values slightly
    below 0 are valid (the estimator is unbiased) and mean the sets are indistinguishable. The sets must be
    disjoint: rows shared by both sides put k(x, x) into the cross term and pull the value below 0.
    """
    import torch
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    real, fake = _pair(real_features, fake_features)
    if subsets < 1 or subset_size < 2:
        raise InputError(f"KID needs subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    size = min(subset_size, len(real), len(fake))
    result = kid_features_to_metric(
        torch.from_numpy(real),
        torch.from_numpy(fake),
        kid_subsets=subsets,
        kid_subset_size=size,
        kid_kernel="poly",
        kid_kernel_poly_degree=degree,
        kid_kernel_poly_gamma=None,  # 1 / D
        kid_kernel_poly_coef0=1,
        rng_seed=seed,
        verbose=False,
    )
    return Kid(float(result[KEY_METRIC_KID_MEAN]), float(result[KEY_METRIC_KID_STD]), size, subsets)


def kid_interval(
    real_features: Any, fake_features: Any, degree: int = 3, resamples: int = 200, seed: int | None = 0
) -> Any:
    """95 % bootstrap interval of the KID (unbiased MMD², cubic kernel (x·y / D + 1)^degree) over the
    generated images, the real set fixed: for sets no larger than torch-fidelity's subset every "subset" is the
    whole set and its std over subsets is exactly 0, which is no interval. A resampled image drawn twice is not
    paired with itself (pairs of one source row are left out of the generated-generated mean), so each
    resample stays an unbiased MMD² of distinct images. Hand-written: torch-fidelity subsamples without
    replacement only. Kernel matrices are n², so this is for the few-thousand-image sets the demo measures."""
    from cxrdiff.metrics.intervals import bootstrap

    real, fake = _pair(real_features, fake_features)
    dim = real.shape[1]
    k_rr = (real @ real.T / dim + 1.0) ** degree
    k_ff = (fake @ fake.T / dim + 1.0) ** degree
    k_rf_mean = ((real @ fake.T / dim + 1.0) ** degree).mean(axis=0)  # (M,): each generated row's mean to real
    n = len(real)
    real_term = (k_rr.sum() - np.trace(k_rr)) / (n * (n - 1))

    def mmd(idx: np.ndarray) -> float:
        distinct = idx[:, None] != idx[None, :]
        return float(real_term + k_ff[np.ix_(idx, idx)][distinct].mean() - 2.0 * k_rf_mean[idx].mean())

    return bootstrap(len(fake), mmd, resamples=resamples, seed=seed, over="generated images")


# --- precision, recall, density, coverage ----------------------------------------------------


class Prdc(NamedTuple):
    """Naeem et al. (2020) manifold metrics; `k` is the neighbourhood size that set the radii."""

    precision: float
    recall: float
    density: float
    coverage: float
    k: int


def _kth_neighbour_distance(features: np.ndarray, k: int) -> np.ndarray:
    """Each row's distance to its k-th nearest other row (itself excluded), Euclidean."""
    from sklearn.neighbors import NearestNeighbors

    distances, _ = NearestNeighbors(n_neighbors=k + 1).fit(features).kneighbors(features)
    return distances[:, k]  # column 0 is the row itself (distance 0)


def prdc(real_features: Any, fake_features: Any, k: int = 5) -> Prdc:
    """Precision, recall, density and coverage of generated features against real ones (Naeem et al. 2020).

    With r_i the distance of real i to its k-th nearest real neighbour and B(x, r) the open ball:
      precision = share of generated points inside some real ball B(real_i, r_i);
      recall    = share of real points inside some generated ball (radii from the generated set);
      density   = (1 / kM) Σ_j #{i : generated_j ∈ B(real_i, r_i)}  (≈ 1 when the sets match; unbounded);
      coverage  = share of real i whose nearest generated point lies inside B(real_i, r_i).

    Written here, not imported: `prdc` 0.2 (the authors' code, which CheXGenBench calls) is unmaintained
    since 2020, prints on every call and holds full N×M matrices with 8 jobs; these lines follow its
    definitions exactly (and agree with it to float precision), in blocks of generated rows.
    """
    from scipy.spatial.distance import cdist

    real, fake = _pair(real_features, fake_features)
    if k < 1 or k >= min(len(real), len(fake)):
        raise InputError(f"PRDC needs 1 <= k < both set sizes, got k={k} for {len(real)} real, {len(fake)} generated")
    real_radii = _kth_neighbour_distance(real, k)  # (N,)
    fake_radii = _kth_neighbour_distance(fake, k)  # (M,)
    inside_count = np.zeros(len(fake))  # per generated point: how many real balls hold it
    real_recalled = np.zeros(len(real), dtype=bool)  # per real point: inside some generated ball
    nearest_fake = np.full(len(real), np.inf)  # per real point: distance to its nearest generated point
    for start in range(0, len(fake), PRDC_CHUNK):
        block = cdist(real, fake[start : start + PRDC_CHUNK])  # (N, block)
        inside_count[start : start + PRDC_CHUNK] = (block < real_radii[:, None]).sum(axis=0)
        real_recalled |= (block < fake_radii[None, start : start + PRDC_CHUNK]).any(axis=1)
        nearest_fake = np.minimum(nearest_fake, block.min(axis=1))
    return Prdc(
        precision=float((inside_count > 0).mean()),
        recall=float(real_recalled.mean()),
        density=float(inside_count.sum() / (k * len(fake))),
        coverage=float((nearest_fake < real_radii).mean()),
        k=k,
    )


# --- features from a local Hugging Face vision model -----------------------------------------


class HfVisionFeatures:
    """Image features from a local Hugging Face vision model folder (config, weights, preprocessor config).

    Loaded with `AutoModel` and `AutoImageProcessor`, `local_files_only=True`: nothing is downloaded, and a
    hub name such as "microsoft/rad-dino" that is not a local folder is an InputError. The feature is:
      - "cls": the CLS token of `last_hidden_state` for models with one (ViT, DINOv2 incl. RadDino, DeiT,
        BEiT: any whose embeddings carry a `cls_token`). For DINOv2 this equals its `pooler_output` (the
        CLS token after the final layer norm), which is what CheXGenBench takes; for ViT it avoids the
        extra tanh pooler layer, which self-supervised checkpoints leave untrained.
      - "pooler_output", flattened, for models without a CLS token (ResNet, ConvNeXt, Swin).
    Grey images are repeated to 3 channels and handed to the model's own processor as 8-bit images
    (its resize, crop and normalisation), in eval mode under no_grad: the same input gives the same output.

    Call it on a float batch (B, 1 or 3, H, W) in [0, 1] (the `fd_features` convention, so it plugs into
    `fd_features(real, fake, features=HfVisionFeatures(folder), name="FD (RadDino)")`), or use `extract`.
    """

    def __init__(self, folder: str | os.PathLike, device: str = "cpu"):
        import torch
        from transformers import AutoImageProcessor, AutoModel

        path = Path(folder)
        if not path.is_dir():
            raise InputError(
                f"{folder}: no such local model folder (nothing is downloaded; a hub name must be downloaded "
                "first and its folder given)"
            )
        if not (path / "config.json").is_file():
            raise InputError(f"{path}: not a Hugging Face model folder (no config.json)")
        try:
            self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"{path}: cannot load as a vision model with its image processor ({first})") from None
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.device = device
        self.folder = path
        embeddings = getattr(self.model, "embeddings", None)
        self.pooling = "cls" if getattr(embeddings, "cls_token", None) is not None else "pooler_output"
        self._torch = torch

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def protocol(self) -> dict[str, Any]:
        """What the features are, for a report's protocol."""
        return {
            "model_folder": str(self.folder),
            "model_type": getattr(self.model.config, "model_type", None),
            "pooling": self.pooling,
            "processor": type(self.processor).__name__,
        }

    def _pool(self, outputs: Any) -> Any:
        if self.pooling == "cls":
            return outputs.last_hidden_state[:, 0]  # (batch, hidden)
        pooled = getattr(outputs, "pooler_output", None)
        if pooled is None:
            raise InputError(f"{self.folder}: the model has neither a CLS token nor a pooler_output")
        return pooled.flatten(1)  # (batch, dim), e.g. ResNet's (batch, C, 1, 1)

    def __call__(self, images: Any) -> Any:
        """(B, 1 or 3, H, W) float in [0, 1] or uint8 → (B, D) float32 tensor on the CPU."""
        torch = self._torch
        images = torch.as_tensor(images)
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise InputError(f"images must be (B, 1 or 3, H, W), got {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
        images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        batch = [image.permute(1, 2, 0).cpu().numpy() for image in images]  # (H, W, 3) uint8 each
        inputs = self.processor(images=batch, return_tensors="pt")
        with torch.no_grad():
            outputs = self.model(pixel_values=inputs["pixel_values"].to(self.device))
        return self._pool(outputs).float().cpu()

    def extract(self, images: Any, size: int | None = None, batch_size: int = 32) -> np.ndarray:
        """Features of an image set (files, or uint8 (N, H, W)) → float64 (N, D); `size` as in `fid`."""
        from cxrdiff.metrics.fid import GreyImages

        dataset = GreyImages(images, size)
        out = []
        for start in range(0, len(dataset), batch_size):
            grey = np.stack([dataset.grey(i) for i in range(start, min(start + batch_size, len(dataset)))])
            out.append(self(self._torch.from_numpy(grey)[:, None]).double().numpy())  # (batch, dim)
        if not out:
            raise InputError("no images to extract features from")
        return np.concatenate(out)
