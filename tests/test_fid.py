"""Fréchet distances: the closed form against hand-computed and scipy values, and the feature wiring."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from cxrdiff.errors import InputError
from cxrdiff.metrics import fid as F
from cxrdiff.metrics.score import UNTRAINED_LABEL, Score


@pytest.fixture(autouse=True)
def _no_weight_caches(tmp_path, monkeypatch):
    """Point both libraries' cache folders at an empty place so nothing real is picked up."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def test_frechet_1d_by_hand():
    # N(1, 2²) vs N(3, 1²): (1 - 3)² + (2 - 1)² = 5
    a = {"mu": np.array([1.0]), "sigma": np.array([[4.0]])}
    b = {"mu": np.array([3.0]), "sigma": np.array([[1.0]])}
    assert F.frechet_distance(a, b) == pytest.approx(5.0, abs=1e-9)
    assert F.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_matches_scipy_sqrtm_closed_form():
    rng = np.random.default_rng(0)
    dim = 5
    m1, m2 = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(dim), m2 @ m2.T + 0.1 * np.eye(dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    expected = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))
    got = F.frechet_distance({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2})
    assert got == pytest.approx(expected, rel=1e-7)


def test_feature_statistics_are_mean_and_unbiased_covariance():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(50, 4))
    stats = F.feature_statistics(feats)
    np.testing.assert_allclose(stats["mu"], feats.mean(0))
    np.testing.assert_allclose(stats["sigma"], np.cov(feats, rowvar=False, ddof=1))
    with pytest.raises(InputError, match="at least 2"):
        F.feature_statistics(feats[:1])


def test_missing_weights_name_file_and_place(tmp_path):
    with pytest.raises(InputError, match=F.INCEPTION_FILE) as err:
        F.resolve_weights(None, "inception")
    assert str(tmp_path / "torch") in str(err.value) and "--inception-weights" in str(err.value)
    with pytest.raises(InputError, match="densenet121-res224-all") as err:
        F.resolve_weights(None, "xrv")
    assert ".torchxrayvision" in str(err.value) and "--xrv-weights" in str(err.value)
    with pytest.raises(InputError, match="nope.pt: file not found"):
        F.resolve_weights(tmp_path / "nope.pt", "xrv")
    real = np.zeros((3, 8, 8), np.uint8)
    with pytest.raises(InputError, match="--inception-weights"):
        F.fid(real, real)


def test_xrv_default_path_matches_torchxrayvision():
    import os

    import torchxrayvision as xrv

    url = xrv.models.model_urls[F.XRV_WEIGHTS_NAME]["weights_url"]
    assert F.default_xrv_path() == F.Path(xrv.utils.get_cache_dir()) / os.path.basename(url)


def _images(seed: int, n: int, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 200, size, dtype=np.float32)[None, None, :] + rng.normal(0, 20, (n, size, size))
    return np.clip(base, 0, 255).astype(np.uint8)  # (n, size, size)


@pytest.fixture
def xrv_weights(tmp_path):
    """A DenseNet121 file in torchxrayvision's format (a pickled module) with seeded random weights."""
    import torch

    torch.manual_seed(3)
    model = F.load_xrv_densenet(None, random_features=True)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    path = tmp_path / "xrv.pt"
    torch.save(model, path)
    return path


def test_fid_xrv_through_torch_fidelity_matches_direct_features(tmp_path, xrv_weights):
    import torch

    real, fake = _images(0, 4), _images(1, 4)
    cache = tmp_path / "cache"
    score = F.fid_xrv(real, fake, weights=xrv_weights, cache_root=cache)
    assert score.name == "FID_XRV" and score.label == ""

    model = F.load_xrv_densenet(xrv_weights)
    with torch.no_grad():

        def feats(x):
            batch = torch.from_numpy(x)[:, None].repeat(1, 3, 1, 1)  # (n, 3, h, w) uint8
            inputs = F.xrv_preprocess(batch)  # (n, 1, 224, 224)
            assert inputs.shape[-1] == F.XRV_RESOLUTION and float(inputs.min()) >= -1024 and inputs.max() <= 1024
            return model.features2(inputs).double().numpy()  # (n, 1024)

        fr, ff = feats(real), feats(fake)
    assert fr.shape == (4, 1024)
    expected = F.frechet_distance(F.feature_statistics(fr), F.feature_statistics(ff))
    assert score.value == pytest.approx(expected, rel=1e-4)
    cached = sorted(p.name for p in cache.iterdir())
    assert len(cached) == 2 and all(F.XRV_EXTRACTOR in name for name in cached)  # the two feature sets
    # same inputs: served from cache, same value; a changed image: new cache entries, new value
    assert F.fid_xrv(real, fake, weights=xrv_weights, cache_root=cache).value == score.value
    fake2 = fake.copy()
    fake2[0] = 255 - fake2[0]
    other = F.fid_xrv(real, fake2, weights=xrv_weights, cache_root=cache)
    assert other.value != pytest.approx(score.value, rel=1e-6)
    assert len(list(cache.iterdir())) == 3


def test_bad_xrv_file_is_input_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(InputError, match="bad.pt: not a torchxrayvision weights file"):
        F.load_xrv_densenet(bad)


@pytest.mark.slow
def test_random_features_need_the_flag_and_carry_the_label(tmp_path):
    real, fake = _images(0, 3), _images(1, 3)
    with pytest.raises(InputError):
        F.fid_xrv(real, fake)
    score = F.fid_xrv(real, fake, random_features=True, cache_root=tmp_path / "c")
    assert score.label == UNTRAINED_LABEL and "FID" not in score.name
    assert UNTRAINED_LABEL in score.text() and UNTRAINED_LABEL in score.title
    inc = F.fid(real, fake, random_features=True, cache_root=tmp_path / "c")
    assert inc.label == UNTRAINED_LABEL and inc.name == "FD (random InceptionV3)" and inc.value > 0
    with pytest.raises(ValueError, match="must carry the label"):
        Score("x", 1.0, protocol={"random_features": True})


def test_custom_features_fd_is_named_and_never_fid():
    import torch

    real, fake = _images(0, 10, 16), _images(1, 10, 16)

    def pooled(x):  # (b, 1, h, w) → (b, 2): mean and std of each image
        return torch.stack([x.mean(dim=(1, 2, 3)), x.std(dim=(1, 2, 3))], dim=1)

    score = F.fd_features(real, fake, pooled, "FD (test features)")
    rf = np.stack([real.mean((1, 2)), real.std((1, 2), ddof=1)], 1) / 255.0
    ff = np.stack([fake.mean((1, 2)), fake.std((1, 2), ddof=1)], 1) / 255.0
    expected = F.frechet_distance(F.feature_statistics(rf), F.feature_statistics(ff))
    assert score.value == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="must not be called FID"):
        F.fd_features(real, fake, pooled, "FID (mine)")


def test_fd_carries_its_bootstrap_interval_and_keeps_its_features(tmp_path):
    """The interval is the one metrics.intervals computes on the same features (same seed), it contains the
    value, and the features are saved for comparing two models."""
    import torch

    from cxrdiff.metrics.intervals import frechet_bootstrap

    real, fake = _images(0, 12, 16), _images(1, 12, 16)

    def pooled(x):
        return torch.stack([x.mean(dim=(1, 2, 3)), x.std(dim=(1, 2, 3))], dim=1)

    score = F.fd_features(real, fake, pooled, "FD (test features)", resamples=50, seed=3,
                          keep_features=tmp_path / "f.npz")  # fmt: skip
    kept = np.load(tmp_path / "f.npz")
    again = frechet_bootstrap(kept["real"], kept["fake"], 50, seed=3)
    assert kept["real"].shape == (12, 2) and score.interval["resamples"] == 50
    assert score.interval["low"] == pytest.approx(again.low, rel=1e-4) and score.interval["low"] < score.value
    assert score.value < score.interval["high"] and f"[{score.interval['low']:.1f}," in score.text()
    assert F.fd_features(real, fake, pooled, "FD (test features)", resamples=0).interval is None


@pytest.mark.slow
def test_fid_loads_inception_from_the_local_file(tmp_path):
    import torch

    F.register_extractors()
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    net = FEATURE_EXTRACTORS_REGISTRY[F.RANDOM_INCEPTION_EXTRACTOR]("x", ["2048"])
    path = tmp_path / F.INCEPTION_FILE
    torch.save(net.state_dict(), path)
    real, fake = _images(0, 3), _images(1, 3)
    from_file = F.fid(real, fake, weights=path)
    random = F.fid(real, fake, random_features=True)
    assert from_file.name == "FID" and from_file.label == "" and from_file.protocol["weights"] == str(path)
    assert from_file.value == pytest.approx(random.value, rel=1e-5)  # same weights, two loading paths


def test_grey_images_from_files_are_writable_tensors(tmp_path, monkeypatch):
    """PIL-decoded arrays are read-only; handing them to torch as is warns (and is undefined behaviour)."""
    import torch
    from PIL import Image

    from cxrdiff.metrics.fid import GreyImages

    path = tmp_path / "a.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(path)
    from_numpy = torch.from_numpy
    seen = []
    monkeypatch.setattr(torch, "from_numpy", lambda a: seen.append(a.flags.writeable) or from_numpy(a))
    item = GreyImages([path])[0]
    assert seen == [True]  # torch warns once per process, so check the array it is given
    assert item.shape == (3, 8, 8) and int(item[0, 7, 7]) == 63


@pytest.mark.slow
def test_normalised_twice_feeds_the_first_convolution_minus_3_to_1(tmp_path):
    """The measuring aid for the published FIDs: the network's first convolution sees the torch-fidelity
    input (x - 128) / 128 mapped again by 2v - 1; the standard extractor sees it once."""
    import torch
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    F.register_extractors()
    images = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    images[1] = 255
    seen = {}
    for name in (F.RANDOM_INCEPTION_EXTRACTOR, F.TWICE_RANDOM_EXTRACTOR):
        model = FEATURE_EXTRACTORS_REGISTRY[name](name, ["2048"]).eval()
        first = model.Conv2d_1a_3x3
        conv = first.conv if name == F.TWICE_RANDOM_EXTRACTOR else first
        conv.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0].detach()))
        with torch.no_grad():
            model(images)
    once, twice = seen[F.RANDOM_INCEPTION_EXTRACTOR], seen[F.TWICE_RANDOM_EXTRACTOR]
    assert once.min() == pytest.approx(-1.0) and once.max() == pytest.approx(127 / 128)
    assert twice.min() == pytest.approx(-3.0) and twice.max() == pytest.approx(2 * 127 / 128 - 1)
    torch.testing.assert_close(twice, 2 * once - 1)
    rng = np.random.default_rng(0)
    real, fake = (rng.integers(0, 256, (3, 16, 16)).astype(np.uint8) for _ in range(2))
    score = F.frechet("inception-twice", real, fake, random_features=True, resamples=0)
    assert score.name == "FD (random InceptionV3, input normalised twice)" and score.label == UNTRAINED_LABEL
    same = F.frechet("inception-twice", real, real, random_features=True, resamples=0)
    assert score.value > 0 and same.value == pytest.approx(0, abs=1e-3)
