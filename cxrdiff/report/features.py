"""The feature networks a report measures on (`--features`), and image features cached under the report folder.

A network is named by a spec: `inception` (torch-fidelity's InceptionV3, 2048-d pool, as FID), `xrv`
(torchxrayvision's DenseNet121 `features2`, 1024-d, as FID_XRV), `classifier` (the classifier given to the report,
e.g. the demo's phantom classifier: its `features`), or `hf:DIR` / `hf:NAME=DIR` (any local Hugging Face vision
model folder, e.g. RadDino: its CLS token, `metrics.distribution.HfVisionFeatures`). Without `--features` the
report uses the networks its Fréchet distances already use (Inception with FID on, the XRV DenseNet with FID_XRV
on, the classifier when it has features).

Features are what KID, precision / recall / density / coverage (`report.benchmark`) and the nearest-training
search (`report.privacy`) work on, so they are extracted once per network and image set and kept as `.npy` files
in `<out>/.features_cache/`, keyed by the network's weights, the image set's identity, the image list and the
size (a changed key extracts again). Images are decoded on a few threads (PIL releases the GIL) and resized into
the generated images' square frame, as the Fréchet distances do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.artifacts import atomic_path, content_hash
from cxrdiff.errors import InputError
from cxrdiff.metrics.score import UNTRAINED_LABEL
from cxrdiff.report.config import ReportConfig

KINDS = ("inception", "xrv", "classifier", "hf")
CACHE = ".features_cache"
DECODE_THREADS = 8
BATCH = 64  # images per feature batch


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """A parsed `--features` value: the kind, the model folder (hf) and an explicit display name (hf)."""

    kind: str
    folder: Path | None = None
    name: str = ""
    text: str = ""  # as given


def parse_spec(text: str, option: str = "--features") -> NetworkSpec:
    """`inception`, `xrv`, `classifier`, `hf:DIR` or `hf:NAME=DIR`, or a one-line InputError."""
    value = text.strip()
    if value in ("inception", "xrv", "classifier"):
        return NetworkSpec(value, text=value)
    if value.startswith("hf:") and len(value) > 3:
        rest = value[3:]
        name, sep, folder = rest.partition("=")
        if not sep or "/" in name or not name:
            name, folder = "", rest
        return NetworkSpec("hf", Path(folder), name, value)
    raise InputError(f"{option} {text!r}: expected inception, xrv, classifier, hf:DIR or hf:NAME=DIR")


def has_features(classifier: Any) -> bool:
    return classifier is not None and callable(getattr(classifier, "features", None))


def feature_specs(config: ReportConfig, classifier: Any = None) -> list[NetworkSpec]:
    """The networks to measure on: `--features`, else the ones the Fréchet distances use (see the module)."""
    if config.features:
        specs = [parse_spec(s) for s in config.features]
    else:
        kinds = [k for k, on in (("inception", config.fid), ("xrv", config.fid_xrv)) if on]
        specs = [NetworkSpec(k, text=k) for k in kinds]
        if has_features(classifier):
            specs.append(NetworkSpec("classifier", text="classifier"))
    unique: dict[str, NetworkSpec] = {}
    for spec in specs:
        unique.setdefault(spec.text, spec)
    return list(unique.values())


def privacy_spec(config: ReportConfig, classifier: Any = None) -> NetworkSpec | None:
    """The network of the nearest-training search: `--privacy-features`, else the first measured network."""
    if config.privacy_features:
        return parse_spec(config.privacy_features, "--privacy-features")
    specs = feature_specs(config, classifier)
    return specs[0] if specs else None


def spec_identity(spec: NetworkSpec) -> str:
    """What a network contributes to a cache key before it is loaded: its spec, and for a Hugging Face folder
    its contents (the weights of inception / xrv and the classifier join the keys on their own)."""
    return f"{spec.text}@{folder_digest(spec.folder)}" if spec.kind == "hf" and spec.folder else spec.text


def check_spec(spec: NetworkSpec, config: ReportConfig, classifier: Any, option: str) -> None:
    """Refuse a network that cannot load, before any step runs (weights are not read)."""
    from cxrdiff.metrics.fid import default_inception_path, default_xrv_path, resolve_weights

    if spec.kind == "classifier" and not has_features(classifier):
        raise InputError(f"{option} classifier: the report has no classifier with features (give one in the API)")
    for kind, given, default in (
        ("inception", config.inception_weights, default_inception_path()),
        ("xrv", config.xrv_weights, default_xrv_path()),
    ):
        untrained = config.random_features and given is None and not default.is_file()  # as `load_network` decides
        if spec.kind == kind and not untrained:
            resolve_weights(given, kind)
    if spec.kind == "hf":
        folder = spec.folder
        if folder is None or not folder.is_dir():
            raise InputError(f"{option} {spec.text}: no such local model folder (nothing is downloaded)")
        if not (folder / "config.json").is_file():
            raise InputError(f"{option} {spec.text}: not a Hugging Face model folder (no config.json)")


RANGES: dict[str, tuple[float | None, float | None]] = {  # option → inclusive (low, high); None: unbounded
    "min_class_images": (2, None),
    "kid_subsets": (1, None),
    "kid_subset_size": (2, None),
    "prdc_k": (1, None),
    "privacy_max_train": (1, None),
    "privacy_pixels": (8, 512),
    "privacy_pairs": (1, 50),
    "memorization_prompts": (0, 1000),
    "memorization_noise": (1, 64),
    "memorization_steps": (1, 1000),
}


def check_options(config: ReportConfig, classifier: Any = None) -> None:
    """Every option of the benchmark and privacy measures, with its range, and the networks they name."""
    for name, (low, high) in RANGES.items():
        value = getattr(config, name)
        if value is None:
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            span = f"at least {low}" if high is None else f"from {low} to {high}"
            raise InputError(f"--{name.replace('_', '-')} {value}: must be {span}")
    if not 0.0 < config.privacy_quantile < 1.0:
        raise InputError(f"--privacy-quantile {config.privacy_quantile}: must be in (0, 1)")
    for spec in feature_specs(config, classifier):
        check_spec(spec, config, classifier, "--features")
    if config.privacy_features and not config.no_privacy:
        check_spec(parse_spec(config.privacy_features, "--privacy-features"), config, classifier, "--privacy-features")


# --- the networks --------------------------------------------------------------------------------


def folder_digest(folder: Path) -> str:
    """A model folder's contents by file name and sha256 (each file hashed once per process)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(file.relative_to(folder).as_posix().encode() + b"\0" + content_hash(file).encode())
    return digest.hexdigest()


@dataclasses.dataclass
class FeatureNetwork:
    """A loaded network: `name` as the report prints it, `label` (untrained features) that travels with every
    number, `identity` for the caches, and `extract(grey)` from uint8 (B, H, W) images to (B, D) float64."""

    spec: NetworkSpec
    name: str
    identity: str
    label: str = ""
    protocol: dict[str, Any] = dataclasses.field(default_factory=dict)
    model: Any = None
    device: str = "cpu"

    @property
    def fid_family(self) -> bool:
        """Trained InceptionV3: its Fréchet distance is FID and its KID is KID; other networks say their name."""
        return self.spec.kind == "inception" and not self.label

    def metric_name(self, metric: str) -> str:
        """'FID' / 'KID' for trained Inception, else e.g. 'FD (RadDino)', 'KID (RadDino)', 'precision (RadDino)'."""
        if self.fid_family and metric in ("FD", "KID"):
            return "FID" if metric == "FD" else "KID"
        return f"{metric} ({self.name})"

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")[:40] or "network"

    def extract(self, grey: np.ndarray) -> np.ndarray:
        import torch

        batch = torch.from_numpy(np.ascontiguousarray(grey))[:, None]  # (batch, 1, height, width) uint8
        with torch.no_grad():
            if self.spec.kind in ("inception", "xrv"):
                out = self.model(batch.repeat(1, 3, 1, 1).to(self.device))[0]  # torch-fidelity: uint8 (B, 3, H, W)
            elif self.spec.kind == "classifier":
                out = self.model.features(batch.float() / 255.0)  # the `fd_features` convention
            else:
                out = self.model(batch)  # HfVisionFeatures: uint8 accepted
        return np.asarray(torch.as_tensor(out).detach().float().cpu().reshape(len(grey), -1), dtype=np.float64)


def load_network(spec: NetworkSpec, config: ReportConfig, classifier: Any = None) -> FeatureNetwork:
    """The network of a spec, loaded (its weights checked as `check_spec` does)."""
    from cxrdiff.metrics import fid

    if spec.kind == "classifier":
        if not has_features(classifier):
            raise InputError("--features classifier: the report has no classifier with features")
        name = f"{getattr(classifier, 'name', type(classifier).__name__)} features"
        key = getattr(classifier, "cache_key", None)
        identity = f"classifier:{name}:{key if key is not None else id(classifier)}"
        return FeatureNetwork(spec, name, identity, protocol={"features": name}, model=classifier)
    if spec.kind == "hf":
        from cxrdiff.metrics.distribution import HfVisionFeatures

        model = HfVisionFeatures(spec.folder, device=config.device)
        name = spec.name or model.name
        identity = f"hf:{folder_digest(Path(spec.folder))}"
        return FeatureNetwork(spec, name, identity, protocol=model.protocol, model=model, device=config.device)
    from torch_fidelity.utils import create_feature_extractor

    fid.register_extractors()
    inception = spec.kind == "inception"
    default = fid.default_inception_path() if inception else fid.default_xrv_path()
    given = config.inception_weights if inception else config.xrv_weights
    untrained = given is None and config.random_features and not default.is_file()
    path = None if untrained else fid.resolve_weights(given, spec.kind)
    if inception:
        extractor, layer = (fid.RANDOM_INCEPTION_EXTRACTOR if untrained else "inception-v3-compat"), "2048"
        name = "random InceptionV3" if untrained else "InceptionV3"
    else:
        extractor, layer = fid.XRV_EXTRACTOR, "features2"
        name = "random DenseNet121" if untrained else "XRV DenseNet121"
    kwargs: dict[str, Any] = {"verbose": False}
    if path is not None:
        kwargs["feature_extractor_weights_path"] = os.fspath(path)
    if untrained and not inception:
        kwargs["cxrdiff_random_features"] = True
    model = create_feature_extractor(extractor, [layer], cuda=config.device.startswith("cuda"), **kwargs)
    weights = f"random-seed-{fid.RANDOM_SEED}" if untrained else content_hash(Path(path))
    protocol: dict[str, Any] = {"features": f"{extractor} {layer}", "weights": None if path is None else str(path)}
    if untrained:
        protocol["random_features"] = True
    return FeatureNetwork(
        spec,
        name,
        f"{extractor}:{layer}:{weights}",
        label=UNTRAINED_LABEL if untrained else "",
        protocol=protocol,
        model=model,
        device=config.device,
    )


# --- images and cached features ------------------------------------------------------------------


def grey_batches(paths: Sequence[str | os.PathLike], size: int, batch: int = BATCH) -> Iterator[np.ndarray]:
    """uint8 (b, size, size) batches of the images in order, each resized into the square frame."""
    from cxrdiff.images import load_grayscale, resize_center_crop

    def load(path: str | os.PathLike) -> np.ndarray:
        grey = load_grayscale(path)
        return grey if grey.shape == (size, size) else resize_center_crop(grey, size)

    with ThreadPoolExecutor(max_workers=min(DECODE_THREADS, os.cpu_count() or 1)) as pool:
        for start in range(0, len(paths), batch):
            yield np.stack(list(pool.map(load, paths[start : start + batch])))


def cache_file(cache: Path, slug: str, parts: Sequence[Any]) -> Path:
    key = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:24]
    return cache / f"{slug}-{key}.npy"


def paths_digest(paths: Sequence[str | os.PathLike]) -> str:
    return hashlib.sha256("\n".join(os.fspath(p) for p in paths).encode()).hexdigest()


def cached_features(
    network: FeatureNetwork, paths: Sequence[str | os.PathLike], size: int, what: str, cache: Path
) -> np.ndarray:
    """(N, D) features of the images, from `cache` when extracted before with the same network, image set
    (`what`: e.g. the sample folder's manifest hash), image list and size; extracted in batches and saved."""
    file = cache_file(cache, network.slug, [network.identity, what, paths_digest(paths), size])
    if file.is_file():
        return np.load(file)
    out = [network.extract(grey) for grey in grey_batches(paths, size)]
    if not out:
        raise InputError(f"no images to extract {network.name} features from ({what})")
    features = np.concatenate(out)
    save_array(file, features)
    return features


def cached_pixels(paths: Sequence[str | os.PathLike], size: int, what: str, cache: Path) -> np.ndarray:
    """uint8 (N, size, size) images, from `cache` when read before (the pixel-correlation search's input)."""
    file = cache_file(cache, "pixels", [what, paths_digest(paths), size])
    if file.is_file():
        return np.load(file, mmap_mode="r")
    pixels = np.concatenate(list(grey_batches(paths, size, batch=256))) if len(paths) else np.zeros((0, size, size))
    save_array(file, pixels.astype(np.uint8))
    return pixels.astype(np.uint8)


def save_array(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)
