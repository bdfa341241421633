"""MS-SSIM diversity: valid parameters per size, identity, torchmetrics agreement, per-prompt averaging."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as tm_ms_ssim

from cxrdiff.errors import InputError
from cxrdiff.metrics import diversity as D


def _noise(seed: int, n: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = np.cumsum(np.cumsum(rng.normal(size=(n, size, size)), 1), 2)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return (smooth * 255).astype(np.uint8)  # (n, size, size)


@pytest.mark.parametrize("size", [32, 64, 200])
def test_params_are_valid_for_torchmetrics(size):
    params = D.ms_ssim_params(size)
    assert sum(params.betas) == pytest.approx(sum(D.STANDARD_BETAS) if len(params.betas) == 5 else 1.0)
    x = torch.from_numpy(_noise(0, 2, size)).double()[:, None]
    value = tm_ms_ssim(
        x[:1], x[1:], kernel_size=params.kernel_size, sigma=params.sigma, betas=params.betas, data_range=255.0
    )
    assert 0.0 <= float(value) <= 1.0


def test_params_by_size():
    assert D.ms_ssim_params(512) == D.MsSsimParams(11, 1.5, D.STANDARD_BETAS)
    small = D.ms_ssim_params(64)
    assert small.kernel_size == 11 and len(small.betas) == 3
    with pytest.raises(InputError, match="too small"):
        D.ms_ssim_params(8)


def test_identical_images_give_100_percent():
    group = np.repeat(_noise(1, 1, 64), 4, axis=0)  # 4 identical images
    score = D.diversity([group, group])
    assert score.value == pytest.approx(100.0, abs=1e-6) and score.std == pytest.approx(0.0, abs=1e-6)
    assert score.unit == "%" and score.protocol["pairs_per_prompt"] == [6]
    assert score.protocol["data_range"] == 255.0


def test_pair_matches_torchmetrics_directly():
    a = _noise(2, 1, 64)
    noise = np.random.default_rng(3).normal(0, 25, a.shape)
    b = np.clip(a + noise, 0, 255).astype(np.uint8)  # a noisy copy: similar, not equal
    params = D.ms_ssim_params(64)
    ours = D.ms_ssim_pairs(a, b, params)[0]
    theirs = tm_ms_ssim(
        torch.from_numpy(a).float()[:, None],
        torch.from_numpy(b).float()[:, None],
        kernel_size=params.kernel_size,
        sigma=params.sigma,
        betas=params.betas,
        data_range=255.0,
    )
    assert ours == pytest.approx(float(theirs), rel=1e-4)
    assert 0.0 < ours < 0.99


def test_mean_over_prompts_of_mean_over_pairs():
    params = D.ms_ssim_params(64)
    groups = [_noise(10 + k, 4, 64) for k in range(3)]
    per_prompt = []
    for g in groups:
        pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
        per_prompt.append(np.mean([D.ms_ssim_pairs(g[[i]], g[[j]], params)[0] for i, j in pairs]) * 100)
    score = D.diversity(groups)
    assert score.value == pytest.approx(np.mean(per_prompt), rel=1e-6)
    assert score.std == pytest.approx(np.std(per_prompt, ddof=1), rel=1e-6)


def test_files_and_bad_groups(tmp_path):
    from PIL import Image

    imgs = _noise(4, 4, 64)
    paths = []
    for i, img in enumerate(imgs):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img).save(paths[-1])
    assert D.diversity([paths]).value == pytest.approx(D.diversity([imgs]).value, rel=1e-9)
    with pytest.raises(InputError, match="prompt 0 has 1 image"):
        D.diversity([imgs[:1]])
    with pytest.raises(InputError, match="at least one prompt"):
        D.diversity([])
