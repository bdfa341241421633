"""KID, precision/recall/density/coverage and the Hugging Face feature network, on small hand-made sets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cxrdiff.errors import InputError
from cxrdiff.metrics.distribution import HfVisionFeatures, kid, kid_interval, prdc


def _gaussian(n: int, dim: int = 16, shift: float = 0.0, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(loc=shift, size=(n, dim))


# --- KID -------------------------------------------------------------------------------------


def test_kid_near_zero_for_one_distribution_and_positive_for_a_shift():
    real, same, shifted = _gaussian(400, seed=0), _gaussian(400, seed=1), _gaussian(400, shift=0.5, seed=1)
    identical = kid(real, real, subsets=50, subset_size=100)
    resampled = kid(real, same, subsets=50, subset_size=100)
    moved = kid(real, shifted, subsets=50, subset_size=100)
    assert moved.mean > 0.5 and moved.mean > 5 * moved.std
    assert abs(resampled.mean) < 0.01 * moved.mean
    # a set against itself: subsets share rows, whose self-similarity k(x, x) enters the cross term, so the
    # unbiased estimate sits slightly below 0 (about -3 % of the shift's KID here), never above it
    assert -0.05 * moved.mean < identical.mean < 0
    assert (identical.subset_size, identical.subsets) == (100, 50)


def test_kid_is_torch_fidelitys_polynomial_mmd():
    # one subset holding every row: the unbiased MMD² with k(x, y) = (x·y / D + 1)³, by hand
    x, y = _gaussian(30, dim=4, seed=2), _gaussian(20, dim=4, shift=0.3, seed=3)
    got = kid(x, y, subsets=1, subset_size=20, seed=0)
    rng = np.random.RandomState(0)  # torch-fidelity's draws: one subset of 20 from each side, in order
    xs, ys = x[rng.choice(30, 20, replace=False)], y[rng.choice(20, 20, replace=False)]

    def k(a, b):
        return (a @ b.T / 4 + 1) ** 3

    m = 20
    kxx, kyy, kxy = k(xs, xs), k(ys, ys), k(xs, ys)
    expected = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / m**2
    assert got.mean == pytest.approx(expected, rel=1e-10)
    assert got.std == 0.0


def test_kid_clips_the_subset_size_to_the_smaller_set():
    result = kid(_gaussian(50), _gaussian(30, seed=1), subsets=5, subset_size=1000)
    assert result.subset_size == 30
    with pytest.raises(InputError, match="dimension"):
        kid(_gaussian(10, dim=3), _gaussian(10, dim=4))
    with pytest.raises(InputError, match="at least 2"):
        kid(_gaussian(1), _gaussian(10))


def test_kid_of_small_sets_gets_a_bootstrap_interval_not_a_zero_std():
    """≤ 1,000 images a side: torch-fidelity's every subset is the whole set and its "±" is exactly 0. The
    bootstrap over generated images (real fixed) gives the same value and a real interval."""
    real, fake = _gaussian(150, seed=0), _gaussian(120, shift=0.2, seed=1)
    whole = kid(real, fake, subsets=5, subset_size=1000)
    assert whole.subset_size == 120
    same_size = kid(real[:120], fake, subsets=5, subset_size=1000)
    assert same_size.std == pytest.approx(0.0, abs=1e-12)  # the "± 0.0000" the report printed
    interval = kid_interval(real[:120], fake, resamples=300, seed=0)
    assert interval.value == pytest.approx(same_size.mean, rel=1e-9)
    assert interval.low < interval.value < interval.high and "generated images" in interval.method
    alike = kid_interval(real[:120], _gaussian(120, seed=2), resamples=300, seed=0)
    assert alike.low < 0 < alike.high and interval.low > alike.high


def test_benchmark_kid_of_small_sets_carries_the_interval(tmp_path):
    from types import SimpleNamespace

    from cxrdiff.report.benchmark import network_scores
    from cxrdiff.report.config import ReportConfig

    network = SimpleNamespace(label="", protocol={}, metric_name=lambda m: f"{m} (x)")
    config = ReportConfig(out=tmp_path, kid_subsets=3, prdc_k=2, fd_resamples=200)
    scores = {s["name"]: s for s in network_scores(network, _gaussian(80), _gaussian(80, shift=0.3, seed=1), config)}
    kid_score = scores["KID (x)"]
    assert (
        kid_score["std"] is None and kid_score["interval"]["low"] < kid_score["value"] < kid_score["interval"]["high"]
    )
    larger = {s["name"]: s for s in network_scores(network, _gaussian(80), _gaussian(40, seed=1), config)}["KID (x)"]
    assert larger["std"] > 0 and larger["interval"] is None  # real subsets of 40 of 80 differ: their std is one


# --- precision, recall, density, coverage ----------------------------------------------------


def test_prdc_of_identical_sets():
    features = _gaussian(200, dim=8)
    result = prdc(features, features, k=5)
    assert (result.precision, result.recall, result.coverage) == (1.0, 1.0, 1.0)
    assert result.density == pytest.approx(1.0, abs=0.15)
    assert result.k == 5


def test_prdc_by_hand_in_two_dimensions():
    # k = 1: every real radius is 1 (nearest real neighbours at distance 1); the two generated points
    # are 14 apart, so each generated radius is 14.
    real = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.0, 4.0]])
    fake = np.array([[0.2, 0.0], [10.0, 10.0]])
    result = prdc(real, fake, k=1)
    # (0.2, 0) lies in the balls of (0, 0) (0.2 < 1) and (1, 0) (0.8 < 1); (10, 10) in none
    assert result.precision == 0.5
    assert result.density == pytest.approx(2 / 2)  # (2 + 0) balls / (k · 2 generated)
    # nearest generated point of each real: 0.2, 0.8 (inside radius 1); 3.007, 4.005 (outside)
    assert result.coverage == 0.5
    # every real point is within 14 of a generated point: recall is blind to the outlier
    assert math.hypot(10, 10 - 0.2) > 4.005 and result.recall == 1.0


def test_prdc_separates_fidelity_from_diversity():
    real = _gaussian(300, dim=4, seed=0)
    collapsed = real[:10] + 0.01  # few modes: faithful but not diverse
    result = prdc(real, np.repeat(collapsed, 30, axis=0) + _gaussian(300, dim=4, seed=9) * 1e-3, k=5)
    assert result.precision == 1.0 and result.coverage < 0.3 and result.recall < 0.1
    with pytest.raises(InputError, match="k"):
        prdc(real[:5], real[:5], k=5)


# --- Hugging Face vision features ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("hf") / "tiny-vit"
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=12, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, image_size=32, patch_size=8
    )
    ViTModel(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _grey_images(n: int = 5) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, 40, 48), dtype=np.uint8)


def test_hf_features_dinov2_cls_token_is_its_pooler_output(tiny_dinov2):
    import torch

    features = HfVisionFeatures(tiny_dinov2)
    images = _grey_images()
    first, again = features.extract(images, batch_size=2), features.extract(images)
    assert first.shape == (5, 16) and features.pooling == "cls"
    np.testing.assert_array_equal(first, again)  # deterministic, and batching does not matter
    assert not np.allclose(first[0], first[1])
    # the same images through the processor and model by hand: DINOv2's pooler_output (CheXGenBench's feature)
    rgb = [np.repeat(image[..., None], 3, axis=-1) for image in images]
    with torch.no_grad():
        pooled = features.model(**features.processor(images=rgb, return_tensors="pt")).pooler_output
    np.testing.assert_allclose(first, pooled.double().numpy(), rtol=1e-6, atol=1e-6)
    # float [0, 1] batches (the fd_features convention) give the same features as the uint8 images
    as_float = features(torch.from_numpy(images)[:, None].float() / 255.0)
    np.testing.assert_allclose(as_float.double().numpy(), first, rtol=1e-6, atol=1e-6)
    assert features.protocol["model_type"] == "dinov2"


def test_hf_features_vit_uses_cls_not_the_tanh_pooler(tiny_vit):
    import torch

    features = HfVisionFeatures(tiny_vit)
    got = features.extract(_grey_images(3))
    assert got.shape == (3, 12) and features.pooling == "cls"
    rgb = [np.repeat(image[..., None], 3, axis=-1) for image in _grey_images(3)]
    with torch.no_grad():
        out = features.model(**features.processor(images=rgb, return_tensors="pt"))
    np.testing.assert_allclose(got, out.last_hidden_state[:, 0].double().numpy(), rtol=1e-6, atol=1e-6)


def test_hf_features_missing_or_hub_name_is_an_input_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(InputError, match="no-such-model: no such local model folder") as err:
        HfVisionFeatures(missing)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="microsoft/rad-dino: no such local model folder"):
        HfVisionFeatures("microsoft/rad-dino")
    with pytest.raises(InputError, match="no config.json"):
        HfVisionFeatures(tmp_path)
