"""Fréchet distances between real and generated X-rays: FID (InceptionV3), FID_XRV (torchxrayvision
DenseNet121 `features2`), and a Fréchet distance on any other feature network, named as such.

Weights are only ever read from local files: a missing file is an `InputError` that names the file and
where to put it; nothing is downloaded. Feature extraction and caching go through torch-fidelity; the
X-ray DenseNet is registered with it as a feature extractor, and every cache entry is keyed by a hash of
the input images, the preprocessing and the weights, so a changed input is never served from cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from cxrdiff.artifacts import file_sha256
from cxrdiff.errors import InputError
from cxrdiff.metrics.intervals import FRECHET_RESAMPLES
from cxrdiff.metrics.score import UNTRAINED_LABEL, Score

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's converted TF InceptionV3
XRV_WEIGHTS_NAME = "densenet121-res224-all"
XRV_FILE = "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
XRV_RESOLUTION = 224
XRV_RANGE = 1024.0
XRV_EXTRACTOR = "cxrdiff-xrv-densenet121"
RANDOM_INCEPTION_EXTRACTOR = "cxrdiff-inception-v3-random"
TWICE_EXTRACTOR = "cxrdiff-inception-v3-normalised-twice"  # measurement only (fid_normalised_twice)
TWICE_RANDOM_EXTRACTOR = "cxrdiff-inception-v3-random-normalised-twice"
RANDOM_SEED = 0

ImageSet = Sequence[str | os.PathLike] | np.ndarray  # image files, or uint8 (N, H, W)


# --- where the weights live ------------------------------------------------------------------


def default_inception_path() -> Path:
    """Where torch-fidelity's own download would have put the InceptionV3 weights (torch hub cache)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def default_xrv_path() -> Path:
    """Where torchxrayvision's own download would have put `densenet121-res224-all`."""
    return Path(os.path.expanduser("~")) / ".torchxrayvision" / "models_data" / XRV_FILE


def resolve_weights(given: str | os.PathLike | None, kind: str) -> Path:
    """The local weights file for `kind` ("inception" or "xrv"), or an InputError saying where it goes."""
    default, flag, what = (
        (default_inception_path(), "--inception-weights", f"InceptionV3 FID weights ({INCEPTION_FILE})")
        if kind == "inception"
        else (default_xrv_path(), "--xrv-weights", f"torchxrayvision {XRV_WEIGHTS_NAME} weights ({XRV_FILE})")
    )
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise InputError(f"{flag} {path}: file not found ({what}; nothing is downloaded)")
        return path
    if default.is_file():
        return default
    raise InputError(
        f"{what} not found: put the file at {default} or pass {flag} PATH "
        "(nothing is downloaded; or pass --random-features for labelled, untrained features)"
    )


# --- Fréchet distance ------------------------------------------------------------------------


def feature_statistics(features: Any) -> dict[str, np.ndarray]:
    """Mean and covariance of (N, D) features, as torch-fidelity computes them (float64)."""
    import torch
    from torch_fidelity.metric_fid import fid_features_to_statistics

    tensor = torch.as_tensor(np.asarray(features, dtype=np.float64))  # (n, dim)
    if tensor.dim() != 2 or tensor.shape[0] < 2:
        raise InputError(f"need at least 2 feature vectors of shape (N, D), got {tuple(tensor.shape)}")
    return fid_features_to_statistics(tensor)


def frechet_distance(stats_1: dict[str, np.ndarray], stats_2: dict[str, np.ndarray]) -> float:
    """||mu1 - mu2||² + tr(S1 + S2 - 2 (S1 S2)^½), via torch-fidelity's eigenvalue form."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    stats_1 = {"mu": np.atleast_1d(stats_1["mu"]), "sigma": np.atleast_2d(stats_1["sigma"])}
    stats_2 = {"mu": np.atleast_1d(stats_2["mu"]), "sigma": np.atleast_2d(stats_2["sigma"])}
    return float(fid_statistics_to_metric(stats_1, stats_2, verbose=False)[KEY_METRIC_FID])


# --- images ----------------------------------------------------------------------------------


class GreyImages(Dataset):
    """A torch Dataset of grey images as uint8 (3, H, W) (grey repeated: what torch-fidelity expects).

    Images whose size differs from `size` go through the prepared frame's resize + centre crop, so
    real and generated images are compared in the same square frame.
    """

    def __init__(self, images: ImageSet, size: int | None = None):
        self.images = images
        self.size = size

    def __len__(self) -> int:
        return len(self.images)

    def grey(self, index: int) -> np.ndarray:
        from cxrdiff.images import load_grayscale, resize_center_crop

        item = self.images[index]
        array = np.asarray(item, dtype=np.uint8) if isinstance(self.images, np.ndarray) else load_grayscale(item)
        if self.size is not None and array.shape != (self.size, self.size):
            array = resize_center_crop(array, self.size)
        return array  # (height, width) uint8

    def __getitem__(self, index: int):
        import torch

        grey = np.array(self.grey(index))  # a copy: PIL's arrays are read-only, which torch warns about
        return torch.from_numpy(grey)[None].repeat(3, 1, 1)  # (3, height, width)


def images_digest(images: ImageSet) -> str:
    """A hash of the image contents in order (file bytes, or array bytes)."""
    digest = hashlib.sha256()
    if isinstance(images, np.ndarray):
        digest.update(str(images.shape).encode())
        digest.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    else:
        for path in images:
            if not Path(path).is_file():
                raise InputError(f"{path}: image not found")
            digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def _cache_name(images: ImageSet, preprocessing: dict[str, Any]) -> str:
    key = images_digest(images) + json.dumps(preprocessing, sort_keys=True, default=str)
    return "cxrdiff-" + hashlib.sha256(key.encode()).hexdigest()[:32]


# --- the torchxrayvision DenseNet ------------------------------------------------------------


def load_xrv_densenet(path: str | os.PathLike | None, random_features: bool = False) -> Any:
    """torchxrayvision's DenseNet121 (`densenet121-res224-all`, 18 outputs) from a local file.

    torchxrayvision ships this model as a pickled whole module, so loading it unpickles code: only the
    file the user named (or the library's own cache file) is ever loaded, never a downloaded one. A
    plain state dict is accepted too. `random_features=True` and no path: the same architecture,
    randomly initialised with a fixed seed (for plumbing only; its numbers are labelled).
    """
    import torch
    import torchxrayvision as xrv

    labels = list(xrv.models.model_urls[XRV_WEIGHTS_NAME]["labels"])
    torch.manual_seed(RANDOM_SEED)
    model = xrv.models.DenseNet(num_classes=len(labels))  # weights=None: no download, no internal resize
    model.pathologies = model.targets = labels
    if path is not None:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # unpickling raises many types for a wrong file
            raise InputError(f"{path}: not a torchxrayvision weights file ({type(exc).__name__}: {exc})") from None
        state = saved.state_dict() if isinstance(saved, torch.nn.Module) else saved
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as exc:
            first = str(exc).splitlines()[0]
            raise InputError(f"{path}: does not fit DenseNet121 {XRV_WEIGHTS_NAME} ({first})") from None
    elif not random_features:
        raise InputError("no torchxrayvision weights given (use --xrv-weights PATH)")
    return model.eval().requires_grad_(False)


def xrv_preprocess(images: Any) -> Any:
    """uint8 (B, C, H, W) → float (B, 1, 224, 224) in [-1024, 1024], resized by us (bilinear, antialiased)
    because torchxrayvision's own resize changed between versions."""
    import torch.nn.functional as F

    grey = images.float().mean(dim=1, keepdim=True)  # (batch, 1, height, width) in [0, 255]
    grey = F.interpolate(grey, size=(XRV_RESOLUTION, XRV_RESOLUTION), mode="bilinear", antialias=True)
    return (grey / 255.0 * 2.0 - 1.0) * XRV_RANGE  # (batch, 1, 224, 224)


def _xrv_extractor_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class XrvDenseNetFeatures(FeatureExtractorBase):
        """torch-fidelity extractor: torchxrayvision DenseNet121 `features2` (1024-d) on our preprocessing."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            self.model = load_xrv_densenet(
                feature_extractor_weights_path, random_features=bool(kwargs.get("cxrdiff_random_features"))
            )

        @staticmethod
        def get_provided_features_list():
            return ("features2",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "features2"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            raise NotImplementedError

        def forward(self, x):
            return (self.model.features2(xrv_preprocess(x)),)  # ((batch, 1024),)

    return XrvDenseNetFeatures


def _random_inception_class():
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInception(FeatureExtractorInceptionV3):
        """torch-fidelity's InceptionV3 with its default (seeded) initialisation instead of weights."""

        def __init__(self, name, features_list, **kwargs):
            torch.manual_seed(RANDOM_SEED)
            with tempfile.TemporaryDirectory() as tmp:
                empty = Path(tmp) / "empty.pth"
                torch.save({}, empty)  # the parent always loads a file; an empty dict keeps the random init
                super().__init__(name, features_list, feature_extractor_weights_path=str(empty))

        def load_state_dict(self, state_dict, strict=True, assign=False):
            if state_dict:
                return super().load_state_dict(state_dict, strict=strict, assign=assign)
            return None

    return RandomInception


def _normalised_twice(base: type) -> type:
    """An InceptionV3 extractor whose input is normalised a second time, as the paper's reference code did:
    torch-fidelity maps uint8 to [-1, 1] ((x - 128) / 128), and the network then applies the [0, 1] → [-1, 1]
    map (2v - 1) to that again, so its first convolution sees [-3, 1]. For measuring the difference only."""
    import torch

    class Twice(torch.nn.Module):
        def __init__(self, conv: torch.nn.Module):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return self.conv(2.0 * x - 1.0)  # (batch, 3, 299, 299) already in [-1, 1] → [-3, 1]

    class NormalisedTwice(base):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list, **kwargs)
            self.Conv2d_1a_3x3 = Twice(self.Conv2d_1a_3x3)

    return NormalisedTwice


def register_extractors() -> None:
    """Register our feature extractors with torch-fidelity once per process."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if XRV_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(XRV_EXTRACTOR, _xrv_extractor_class())
    if RANDOM_INCEPTION_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(RANDOM_INCEPTION_EXTRACTOR, _random_inception_class())
    if TWICE_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(TWICE_EXTRACTOR, _normalised_twice(FeatureExtractorInceptionV3))
        register_feature_extractor(TWICE_RANDOM_EXTRACTOR, _normalised_twice(_random_inception_class()))


# --- the metrics -----------------------------------------------------------------------------


def _torch_fidelity_fd(
    real: ImageSet,
    fake: ImageSet,
    extractor: str,
    layer: str,
    weights: Path | None,
    preprocessing: dict[str, Any],
    size: int | None,
    cache_root: str | os.PathLike | None,
    device: str,
    batch_size: int,
    **extra: Any,
) -> tuple[float, np.ndarray, np.ndarray]:
    """torch-fidelity's Fréchet distance, and the two feature sets it was computed from (for the bootstrap):
    the features are extracted (and cached) by torch-fidelity, the distance is its own statistics → metric."""
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
    from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id_cached

    register_extractors()
    weights_hash = file_sha256(weights) if weights is not None else f"random-seed-{RANDOM_SEED}"
    key = {**preprocessing, "extractor": extractor, "layer": layer, "weights_sha256": weights_hash, "size": size}
    kwargs = dict(
        input1=GreyImages(real, size),
        input2=GreyImages(fake, size),
        input1_cache_name=_cache_name(real, key),
        input2_cache_name=_cache_name(fake, key),
        cache_root=None if cache_root is None else os.fspath(cache_root),
        cache=True,
        fid=True,
        feature_extractor=extractor,
        feature_layer_fid=layer,
        feature_extractor_weights_path=None if weights is None else os.fspath(weights),
        cuda=device.startswith("cuda"),
        batch_size=batch_size,
        save_cpu_ram=True,  # no DataLoader worker processes
        verbose=False,
        **extra,
    )
    network = create_feature_extractor(extractor, [layer], **kwargs)
    features = [extract_featuresdict_from_input_id_cached(i, network, **kwargs) for i in (1, 2)]
    stats = [fid_featuresdict_to_statistics(f, layer) for f in features]
    value = float(fid_statistics_to_metric(stats[0], stats[1], False)["frechet_inception_distance"])
    real_features, fake_features = (np.asarray(f[layer].double().cpu()) for f in features)
    return value, real_features, fake_features


def _with_interval(score: Score, real: np.ndarray, fake: np.ndarray, resamples: int, seed: int,
                   keep: str | os.PathLike | None) -> Score:  # fmt: skip
    """The score with its bootstrap interval over the generated images (metrics.intervals.frechet_bootstrap),
    and the features saved to `keep` (NPZ: real, fake) for a later comparison of two models."""

    from cxrdiff.metrics.intervals import frechet_bootstrap

    if keep is not None:
        from cxrdiff.artifacts import atomic_path

        with atomic_path(keep) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, real=real.astype(np.float32), fake=fake.astype(np.float32))
    if resamples < 1:
        return score
    return dataclasses.replace(score, interval=frechet_bootstrap(real, fake, resamples, seed=seed).as_dict())


def _check_sets(real: ImageSet, fake: ImageSet) -> None:
    for name, images in (("real", real), ("generated", fake)):
        if len(images) < 2:
            raise InputError(f"Fréchet distance needs at least 2 {name} images, got {len(images)}")


@dataclasses.dataclass(frozen=True)
class FeatureNet:
    """What a torch-fidelity Fréchet distance needs to know of its network: the registered extractors (trained,
    and seeded random for `random_features`), the layer, how the images reach it, and the score's names."""

    name: str  # with trained weights
    random_name: str  # with `random_features` and no weights: never called FID
    weights: str  # `resolve_weights`' kind
    extractor: str
    random_extractor: str
    layer: str
    preprocessing: dict[str, str]
    note: dict[str, str] = dataclasses.field(default_factory=dict)  # protocol entries of the trained network
    random_extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # extractor kwargs of the random one


INCEPTION_INPUT = {"grey": "repeated to 3 channels", "inception": "torch-fidelity 299 px, (x-128)/128"}
FEATURE_NETS = {
    "inception": FeatureNet(
        "FID", "FD (random InceptionV3)", "inception", "inception-v3-compat", RANDOM_INCEPTION_EXTRACTOR, "2048",
        INCEPTION_INPUT,
    ),
    "xrv": FeatureNet(
        "FID_XRV", "FD (random DenseNet121)", "xrv", XRV_EXTRACTOR, XRV_EXTRACTOR, "features2",
        {
            "grey": "channel mean",
            "xrv": f"bilinear antialiased resize to {XRV_RESOLUTION}, scaled to [-{XRV_RANGE:g}, {XRV_RANGE:g}]",
            "layer": "features2",
        },
        note={"note": "the 'all' weights saw MIMIC-CXR"},
        random_extra={"cxrdiff_random_features": True},
    ),
    # A measuring aid, never a reported metric: the reference code's double normalisation of the Inception input
    # (see `_normalised_twice`), to size how far the published FIDs are from a standard FID on the same images
    # (docs/method.md, "FID comparability").
    "inception-twice": FeatureNet(
        "FID (input normalised twice)", "FD (random InceptionV3, input normalised twice)", "inception",
        TWICE_EXTRACTOR, TWICE_RANDOM_EXTRACTOR, "2048",
        {"grey": "repeated to 3 channels", "inception": "(x-128)/128, then 2v-1 again (twice)"},
    ),
}  # fmt: skip
DEFAULT_WEIGHTS = {"inception": default_inception_path, "xrv": default_xrv_path}


def frechet(
    network: str,
    real: ImageSet,
    fake: ImageSet,
    weights: str | os.PathLike | None = None,
    random_features: bool = False,
    size: int | None = None,
    cache_root: str | os.PathLike | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    resamples: int = FRECHET_RESAMPLES,
    seed: int = 0,
    keep_features: str | os.PathLike | None = None,
) -> Score:
    """The Fréchet distance on `network` (a FEATURE_NETS key), with a bootstrap interval over the generated images
    (`resamples`, 0: none) and the features kept in `keep_features`. Without weights and with `random_features`,
    the same network randomly initialised: the score is named "FD (random ...)" and labelled untrained."""
    net = FEATURE_NETS[network]
    _check_sets(real, fake)
    untrained = weights is None and random_features and not DEFAULT_WEIGHTS[net.weights]().is_file()
    path = None if untrained else resolve_weights(weights, net.weights)
    extractor, extra = (net.random_extractor, net.random_extra) if untrained else (net.extractor, {})
    value, r, f = _torch_fidelity_fd(
        real, fake, extractor, net.layer, path, net.preprocessing, size, cache_root, device, batch_size, **extra
    )
    n = {"n": [len(real), len(fake)]}
    if untrained:
        protocol = {**net.preprocessing, "random_features": True, "seed": RANDOM_SEED, **n}
        score = Score(net.random_name, value, label=UNTRAINED_LABEL, protocol=protocol)
    else:
        score = Score(net.name, value, protocol={**net.preprocessing, "weights": str(path), **net.note, **n})
    return _with_interval(score, r, f, resamples, seed, keep_features)


def fid(real: ImageSet, fake: ImageSet, **options: Any) -> Score:
    """FID on torch-fidelity's InceptionV3 (2048-d pool features; it resizes to 299 itself). Grey images are
    repeated to 3 channels and normalised once, inside torch-fidelity (the reference code normalised twice; we do
    not: `frechet("inception-twice", ...)` measures the difference). Options: `frechet`'s."""
    return frechet("inception", real, fake, **options)


def fid_xrv(real: ImageSet, fake: ImageSet, **options: Any) -> Score:
    """FID_XRV: Fréchet distance on torchxrayvision DenseNet121 `features2` (1024-d), grey in [-1024, 1024] at
    224 px (resized by us). Options: `frechet`'s."""
    return frechet("xrv", real, fake, **options)


def fd_features(
    real: ImageSet,
    fake: ImageSet,
    features: Callable[[Any], Any],
    name: str,
    size: int | None = None,
    batch_size: int = 64,
    label: str = "",
    resamples: int = FRECHET_RESAMPLES,
    seed: int = 0,
    keep_features: str | os.PathLike | None = None,
) -> Score:
    """A Fréchet distance on a custom feature network, e.g. "FD (phantom classifier features)"; interval and
    kept features as `fid`.

    `features` maps float images (B, 1, H, W) in [0, 1] to (B, D). Never call the result FID: the name
    is the caller's and should say which features it used.
    """
    import torch

    _check_sets(real, fake)
    if name.upper().startswith("FID"):
        raise ValueError(f"{name!r}: a custom feature network's distance must not be called FID")

    def extract(images: ImageSet) -> np.ndarray:
        dataset = GreyImages(images, size)
        out = []
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                batch = np.stack([dataset.grey(i) for i in range(start, min(start + batch_size, len(dataset)))])
                tensor = torch.from_numpy(batch).float()[:, None] / 255.0  # (batch, 1, height, width)
                out.append(np.asarray(torch.as_tensor(features(tensor)).detach().cpu().double()))  # (batch, dim)
        return np.concatenate(out)

    real_features, fake_features = extract(real), extract(fake)
    value = frechet_distance(feature_statistics(real_features), feature_statistics(fake_features))
    score = Score(name, value, label=label, protocol={"features": name, "n": [len(real), len(fake)], "size": size})
    return _with_interval(score, real_features, fake_features, resamples, seed, keep_features)
