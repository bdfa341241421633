"""Sample diversity as the paper measures it: MS-SSIM over the pairs of images made from one prompt.

For each prompt, the mean MS-SSIM of its images' pairs (6 pairs for 4 images); then mean ± std over
prompts, in %. Lower means more diverse. Pairs never mix prompts (the reference code did by mistake).
The MS-SSIM itself is torchmetrics'; the scale count and kernel are chosen so that the coarsest scale
still holds the Gaussian window (SD2's 512 px: the standard 5 scales; the tiny model's 64 px: fewer).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from cxrdiff.errors import InputError
from cxrdiff.metrics.intervals import RESAMPLES, bootstrap_mean
from cxrdiff.metrics.score import Score

STANDARD_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, torchmetrics' default
STANDARD_KERNEL, STANDARD_SIGMA = 11, 1.5
DATA_RANGE = 255.0  # images are compared as 8-bit grey values


@dataclasses.dataclass(frozen=True)
class MsSsimParams:
    """What MS-SSIM was computed with; recorded in the report's protocol."""

    kernel_size: int
    sigma: float
    betas: tuple[float, ...]
    data_range: float = DATA_RANGE
    normalize: str = "relu"

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "scales": len(self.betas)}


def _valid(size: int, kernel: int, scales: int) -> bool:
    # torchmetrics' own checks: size >= 2**scales and size // max(1, scales - 1)**2 > kernel - 1; and the
    # coarsest scale (size / 2**(scales - 1)) must hold the window.
    div = max(max(1, scales - 1) ** 2, 2 ** (scales - 1))
    return size >= 2**scales and size // div > kernel - 1


def ms_ssim_params(size: int) -> MsSsimParams:
    """The most standard MS-SSIM valid at `size` px: 11-px σ 1.5 window with as many of the 5 scales as fit
    (down to 3), then smaller windows; the kept betas are renormalised to sum to 1."""
    for kernel in (STANDARD_KERNEL, 7, 5, 3):
        for scales in range(len(STANDARD_BETAS), 1, -1):
            if kernel < STANDARD_KERNEL and scales < 3:
                continue
            if kernel == STANDARD_KERNEL and scales < 3:
                break
            if _valid(size, kernel, scales):
                kept = STANDARD_BETAS[:scales]
                betas = STANDARD_BETAS if scales == len(STANDARD_BETAS) else tuple(b / sum(kept) for b in kept)
                return MsSsimParams(kernel, STANDARD_SIGMA * kernel / STANDARD_KERNEL, betas)
    raise InputError(f"images of {size} px are too small for MS-SSIM (need at least 24 px)")


def _as_array(images: Any) -> np.ndarray:
    """A prompt's images (paths or uint8 (n, H, W)) as uint8 (n, H, W)."""
    if isinstance(images, np.ndarray):
        return images.astype(np.uint8, copy=False)
    from cxrdiff.images import load_grayscale

    return np.stack([load_grayscale(p) for p in images])


def ms_ssim_pairs(a: np.ndarray, b: np.ndarray, params: MsSsimParams, batch_size: int = 64) -> np.ndarray:
    """MS-SSIM of a[i] with b[i] for uint8 (n, H, W) arrays → (n,) in [0, 1]."""
    import torch
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim

    out = []
    for start in range(0, len(a), batch_size):
        x = torch.from_numpy(a[start : start + batch_size]).double()[:, None]  # (batch, 1, height, width)
        y = torch.from_numpy(b[start : start + batch_size]).double()[:, None]  # (batch, 1, height, width)
        values = ms_ssim(
            x,
            y,
            kernel_size=params.kernel_size,
            sigma=params.sigma,
            betas=params.betas,
            data_range=params.data_range,
            normalize=params.normalize,
            reduction="none",
        )  # (batch,)
        out.append(values.numpy())
    return np.concatenate(out) if out else np.zeros(0)


def diversity(
    groups: Sequence[Any], params: MsSsimParams | None = None, seed: int = 0, resamples: int = RESAMPLES
) -> Score:
    """MS-SSIM in %, mean ± std over prompts of the mean over each prompt's image pairs, with a bootstrap
    interval of that mean over prompts (`seed`, `resamples`).

    `groups`: one entry per prompt, each its images (file paths or uint8 (n, H, W), n >= 2).
    """
    if not groups:
        raise InputError("MS-SSIM diversity needs at least one prompt with 2 or more images")
    arrays = [_as_array(g) for g in groups]
    for i, arr in enumerate(arrays):
        if arr.ndim != 3 or len(arr) < 2:
            raise InputError(f"MS-SSIM diversity: prompt {i} has {len(arr)} image(s); need at least 2")
        if arr.shape[1:] != arrays[0].shape[1:]:
            raise InputError(f"MS-SSIM diversity: prompt {i} images are {arr.shape[1:]}, not {arrays[0].shape[1:]}")
    params = params or ms_ssim_params(min(arrays[0].shape[1:]))
    pairs = [list(itertools.combinations(range(len(arr)), 2)) for arr in arrays]
    left = np.concatenate([arr[[i for i, _ in pp]] for arr, pp in zip(arrays, pairs, strict=True)])
    right = np.concatenate([arr[[j for _, j in pp]] for arr, pp in zip(arrays, pairs, strict=True)])
    values = ms_ssim_pairs(left, right, params)
    bounds = np.cumsum([0] + [len(pp) for pp in pairs])
    per_prompt = np.array([values[s:e].mean() for s, e in itertools.pairwise(bounds)]) * 100.0
    return Score(
        "MS-SSIM",
        float(per_prompt.mean()),
        std=float(per_prompt.std(ddof=1)) if len(per_prompt) > 1 else 0.0,
        unit="%",
        protocol={
            **params.as_dict(),
            "prompts": len(arrays),
            "pairs_per_prompt": sorted({len(pp) for pp in pairs}),
            "pairs": "within each prompt only",
            "std": "over prompts (ddof=1)",
        },
        interval=bootstrap_mean(per_prompt, resamples=resamples, seed=seed, over="prompts").as_dict(),
    )
