"""Nearest training images, the calibrated copy rate and the memorization score, on planted cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cxrdiff.errors import InputError
from cxrdiff.metrics.privacy import (
    copy_rate,
    copy_threshold,
    memorization_score,
    nearest_training,
    pixel_correlation,
)


def _rows(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim))


# --- nearest training ------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "correlation", "euclidean"])
def test_nearest_training_finds_exact_copies(metric):
    train = _rows(60)
    planted = [3, 17, 42]
    generated = np.concatenate([train[planted], _rows(5, seed=1)])
    result = nearest_training(generated, train, metric=metric)
    np.testing.assert_array_equal(result.index[:3], planted)
    perfect = 0.0 if metric == "euclidean" else 1.0
    np.testing.assert_allclose(result.similarity[:3], perfect, atol=1e-6)
    assert (result.similarity[3:] < perfect - 0.1).all()


def test_nearest_training_matches_brute_force_across_blocks(monkeypatch):
    import cxrdiff.metrics.privacy as P

    monkeypatch.setattr(P, "QUERY_BLOCK", 7)
    monkeypatch.setattr(P, "TRAIN_BLOCK", 11)
    train, generated = _rows(50, dim=6), _rows(20, dim=6, seed=2)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    cosine = unit(generated) @ unit(train).T
    result = nearest_training(generated, train)
    np.testing.assert_array_equal(result.index, cosine.argmax(axis=1))
    np.testing.assert_allclose(result.similarity, cosine.max(axis=1), rtol=1e-12)
    distances = np.linalg.norm(generated[:, None] - train[None], axis=2)
    euclid = nearest_training(generated, train, metric="euclidean")
    np.testing.assert_array_equal(euclid.index, distances.argmin(axis=1))
    np.testing.assert_allclose(euclid.similarity, -distances.min(axis=1), rtol=1e-9)


def test_pixel_correlation_finds_copies_even_rewindowed():
    rng = np.random.default_rng(3)
    train = rng.uniform(0, 255, size=(30, 16, 16))
    generated = np.stack([train[5], 0.5 * train[21] + 40.0, rng.uniform(0, 255, size=(16, 16))])
    result = pixel_correlation(generated, train)
    np.testing.assert_array_equal(result.index[:2], [5, 21])
    np.testing.assert_allclose(result.similarity[:2], 1.0, atol=1e-5)
    assert result.similarity[2] < 0.5
    with pytest.raises(InputError, match="one size"):
        pixel_correlation(generated[:, :8], train)
    with pytest.raises(InputError, match="constant"):
        pixel_correlation(np.zeros((1, 16, 16)), train)


def test_bad_metric_and_sizes_are_input_errors():
    with pytest.raises(InputError, match="choose one of"):
        nearest_training(_rows(3), _rows(4), metric="manhattan")
    with pytest.raises(InputError, match="differ in size"):
        nearest_training(_rows(3, dim=4), _rows(4, dim=5))


# --- copy threshold and copy rate ------------------------------------------------------------


def test_copy_threshold_is_the_conformal_order_statistic():
    sims = np.arange(1, 20) / 20  # 19 values 0.05 … 0.95
    assert copy_threshold(sims, quantile=0.95) == pytest.approx(0.95)  # ⌈0.95 · 20⌉ = 19th smallest
    assert copy_threshold(sims, quantile=0.5) == pytest.approx(0.5)  # ⌈0.5 · 20⌉ = 10th smallest
    with pytest.raises(InputError, match="need ≥ 19"):
        copy_threshold(sims[:10], quantile=0.95)
    with pytest.raises(InputError, match="quantile"):
        copy_threshold(sims, quantile=1.0)


def _calibrated(seed: int = 0):
    """Training features, a held-out test set from the same distribution, and the 95 % copy threshold."""
    train, test = _rows(400, seed=seed), _rows(300, seed=seed + 1)
    threshold = copy_threshold(nearest_training(test, train).similarity, quantile=0.95)
    return train, threshold


def test_planted_copies_give_a_copy_rate_near_their_share():
    train, threshold = _calibrated()
    rng = np.random.default_rng(7)
    copies = train[rng.choice(len(train), 10, replace=False)] + 0.2 * rng.normal(size=(10, 32))  # noisy copies
    generated = np.concatenate([copies, _rows(30, seed=8)])  # 10 of 40
    result = copy_rate(nearest_training(generated, train).similarity, threshold)
    # expected 10/40 planted + 30/40 · 5 % false alarms ≈ 0.29 (0.25 … 0.375 over 30 seeds of this setup)
    assert result.copies >= 10 and 0.25 <= result.rate <= 0.4
    assert result.low > 0.05 and result.low <= result.rate <= result.high  # excludes 0 and the nominal 5 %
    assert (result.n, result.confidence) == (40, 0.95)


def test_independent_images_copy_at_the_nominal_rate():
    # 20 independent worlds (training set, held-out test set, generated set, all from one distribution):
    # the rate averages the nominal 5 %, and the interval holds 5 % in most worlds (not 95 % of them: the
    # interval is for the generated sample only; the threshold's own calibration noise comes on top)
    rates, covered = [], 0
    for world in range(20):
        train, threshold = _calibrated(seed=100 + 10 * world)
        result = copy_rate(nearest_training(_rows(300, seed=105 + 10 * world), train).similarity, threshold)
        rates.append(result.rate)
        covered += result.low <= 0.05 <= result.high
    assert 0.035 <= np.mean(rates) <= 0.065
    assert covered >= 15


def test_copy_rate_wilson_interval_by_hand():
    result = copy_rate([0.9] * 10 + [0.1] * 30, threshold=0.5)
    z, n, p = 1.959963984540054, 40, 0.25
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    assert result.rate == 0.25 and result.copies == 10
    assert result.low == pytest.approx(centre - half, rel=1e-9)
    assert result.high == pytest.approx(centre + half, rel=1e-9)
    assert copy_rate([0.5, 0.6], threshold=0.5).copies == 1  # strictly above the threshold


# --- memorization score ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_unet():
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=8,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False)


def test_memorization_score_is_zero_without_a_text_pull(tiny_unet):
    import torch

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    embeds = torch.randn(2, 3, 8, generator=generator)
    scores = memorization_score(tiny_unet, latents, embeds, embeds.clone(), _scheduler(), timesteps=4)
    assert scores.shape == (2,)
    np.testing.assert_allclose(scores, 0.0, atol=1e-6)


def test_memorization_score_by_hand_on_the_first_step(tiny_unet):
    import torch

    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    cond, uncond = torch.randn(2, 3, 8, generator=generator), torch.randn(1, 3, 8, generator=generator)
    scheduler = _scheduler()
    one = memorization_score(tiny_unet, latents, cond, uncond, scheduler, timesteps=4, first=1)
    reference = _scheduler()
    reference.set_timesteps(4)
    t = reference.timesteps[0]
    with torch.no_grad():
        pull = tiny_unet(latents, t, encoder_hidden_states=cond).sample
        pull -= tiny_unet(latents, t, encoder_hidden_states=uncond.expand(2, -1, -1)).sample
    expected = pull.flatten(1).norm(dim=1).double().numpy()  # L2 over all 4·8·8 latent elements
    np.testing.assert_allclose(one, expected, rtol=1e-5)
    assert (one > 0).all()
    everything = memorization_score(tiny_unet, latents, cond, uncond, scheduler, timesteps=4)
    assert everything.shape == (2,) and (everything > 0).all() and not np.allclose(everything, one)
    assert scheduler.num_inference_steps is None  # the caller's scheduler was not touched


def test_copy_count_test_holds_its_level_where_the_wilson_rule_does_not():
    """Known truth: a copy-free model (generated and held-out similarities from one law). With 300 held-out
    images the threshold's own noise makes the Wilson interval sit above 5 % in about 3 runs in 10; the exact
    BetaBinomial test rejects in at most about 5 %. A model that copies 10 % of its images is found."""
    from cxrdiff.metrics.privacy import copy_count_test, copy_rate, copy_threshold

    rng = np.random.default_rng(0)
    wilson = exact = found = 0
    runs = 400
    for _ in range(runs):
        held_out, generated = rng.random(300), rng.random(2000)
        threshold = copy_threshold(held_out, 0.95)
        rate = copy_rate(generated, threshold)
        wilson += rate.low > 0.05
        exact += copy_count_test(rate.copies, rate.n, 300, 0.95) < 0.05
        copier = np.where(rng.random(2000) < 0.10, 1.0, generated)  # 10 % exact copies (similarity 1)
        found += copy_count_test(copy_rate(copier, threshold).copies, 2000, 300, 0.95) < 0.05
    assert wilson / runs > 0.15  # the rule it replaces: a copy-free model called "above 5 %" far too often
    assert exact / runs <= 0.065  # 5 % and Monte-Carlo error (s.e. 1.1 %)
    assert found / runs > 0.95


def test_copy_count_law_is_the_simulated_one():
    """The p-value of the expected count is about a half, and the law's mean is n_gen (1 − k / (n_cal + 1))."""
    from scipy.stats import betabinom

    from cxrdiff.metrics.privacy import copy_count_test

    k = math.ceil(0.95 * 301)  # 286
    assert betabinom.mean(1000, 301 - k, k) == pytest.approx(1000 * (301 - k) / 301)
    rng = np.random.default_rng(1)
    counts = [int((rng.random(1000) > np.sort(rng.random(300))[k - 1]).sum()) for _ in range(4000)]
    assert np.mean(counts) == pytest.approx(1000 * 15 / 301, rel=0.03)
    share = np.mean([c >= 80 for c in counts])  # simulated P(count ≥ 80) against the law's
    assert copy_count_test(80, 1000, 300) == pytest.approx(share, abs=0.01)
    with pytest.raises(InputError, match="not a count"):
        copy_count_test(5, 4, 300)


def test_similarity_test_tells_farther_images_from_exchangeable_ones():
    from cxrdiff.metrics.privacy import similarity_test

    rng = np.random.default_rng(2)
    held_out = rng.normal(0.8, 0.05, 300)
    assert similarity_test(rng.normal(0.8, 0.05, 500), held_out)[1] > 0.01
    assert similarity_test(rng.normal(0.7, 0.05, 500), held_out)[1] < 1e-6  # farther from training: differs
