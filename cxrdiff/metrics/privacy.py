"""Privacy of generated X-rays: nearest training images, a calibrated copy rate, and the memorization score.

Three measurements, each with its rule written down:
  - `nearest_training` / `pixel_correlation`: for every generated image, its most similar training image
    over the whole training set (feature cosine, or Pearson correlation of pixels).
  - `copy_threshold` + `copy_rate`: "copy" is calibrated on real held-out test images, which the model
    never saw: a generated image is a copy when it is closer to its nearest training image than a share
    `quantile` of held-out test images are to theirs. A model that does not copy produces copies at the
    nominal rate 1 - quantile (5 % for 0.95) on average; the rate comes with a Wilson binomial interval, and
    whether it exceeds the nominal rate is an exact one-sided test (`copy_count_test`) that includes the
    threshold's own calibration noise.
  - `memorization_score`: Wen et al. (ICLR 2024) / Dutt et al. (arXiv 2502.07516): how strongly the text
    pulls the noise prediction, ||ε(x_t, c) − ε(x_t, ∅)||₂, averaged over the sampling steps.

How this differs from CheXGenBench (`metrics/privacy_metrics.py`): there, each prompt's 10 generations are
compared with the one training image paired with that prompt (a patient re-identification Siamese
network's score, a pixel distance and a RadDino L2 distance / sqrt(D)), and the mean and max are
reported without a reference level. Here the comparison is against every training image (a copy of
another patient's image counts too), and a held-out test set says what "close" means for images that
cannot be copies. The pixel measure is a correlation (brightness and contrast free), not a distance.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from cxrdiff.errors import InputError

METRICS = ("cosine", "correlation", "euclidean")
QUERY_BLOCK = 256  # generated rows per block of the similarity matrix
TRAIN_BLOCK = 4096  # training rows per block


class Nearest(NamedTuple):
    """Per generated row: the index of its nearest training row and their similarity (higher = closer)."""

    index: np.ndarray  # (N,) int
    similarity: np.ndarray  # (N,) float


def _matrix(array: Any, what: str, dtype: Any = np.float64) -> np.ndarray:
    values = np.asarray(array.detach().cpu() if hasattr(array, "detach") else array, dtype=dtype)
    if values.ndim != 2 or len(values) == 0:
        raise InputError(f"{what}: need a non-empty (N, D) array, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise InputError(f"{what}: contains NaN or inf")
    return values


def _unit_rows(rows: np.ndarray, centre: bool, what: str) -> np.ndarray:
    if centre:
        rows = rows - rows.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    if (norms == 0).any():
        kind = "constant" if centre else "all-zero"
        raise InputError(f"{what}: row {int(np.argmin(norms[:, 0]))} is {kind}; its similarity is undefined")
    return rows / norms


def _nearest(queries: np.ndarray, train: np.ndarray, metric: str) -> Nearest:
    if metric not in METRICS:
        raise InputError(f"metric {metric!r}: choose one of {', '.join(METRICS)}")
    if queries.shape[1] != train.shape[1]:
        raise InputError(f"generated and training rows differ in size: {queries.shape[1]} vs {train.shape[1]}")
    if metric != "euclidean":
        centre = metric == "correlation"
        queries = _unit_rows(queries, centre, "generated")
        train = _unit_rows(train, centre, "training")
    else:
        train_sq = np.einsum("ij,ij->i", train, train)
    best_index = np.zeros(len(queries), dtype=np.int64)
    best = np.full(len(queries), -np.inf)
    for q in range(0, len(queries), QUERY_BLOCK):
        block = queries[q : q + QUERY_BLOCK]
        for t in range(0, len(train), TRAIN_BLOCK):
            scores = block @ train[t : t + TRAIN_BLOCK].T  # (queries, train rows)
            if metric == "euclidean":  # -||q - t||² up to the query's own norm, which is the same for a row
                scores = 2 * scores - train_sq[None, t : t + TRAIN_BLOCK]
            local = scores.argmax(axis=1)
            value = scores[np.arange(len(block)), local]
            better = value > best[q : q + QUERY_BLOCK]  # strict: ties keep the first training index
            best[q : q + QUERY_BLOCK][better] = value[better]
            best_index[q : q + QUERY_BLOCK][better] = local[better] + t
    if metric == "euclidean":
        query_sq = np.einsum("ij,ij->i", queries, queries)
        best = -np.sqrt(np.maximum(query_sq - best, 0.0))  # similarity = −distance
    return Nearest(best_index, np.clip(best, -1.0, 1.0) if metric != "euclidean" else best)


def nearest_training(gen_features: Any, train_features: Any, metric: str = "cosine") -> Nearest:
    """Each generated image's nearest training image by feature similarity, over the whole training set.

    `metric`: "cosine" (default; RadDino-style embeddings), "correlation" (Pearson, i.e. cosine of
    mean-centred rows), or "euclidean" (similarity = −L2 distance, so that higher is always closer).
    Ties go to the lowest training index. float64, in blocks of rows.
    """
    return _nearest(_matrix(gen_features, "generated features"), _matrix(train_features, "training features"), metric)


def pixel_correlation(gen_images: Any, train_images: Any) -> Nearest:
    """Each generated image's nearest training image by Pearson correlation of the pixels.

    Images are (N, H, W) arrays of one size (resize first: correlation over 64×64 is plenty and keeps the
    training set in memory, float32). Correlation ignores brightness and contrast: a copy that is
    re-windowed (a·x + b, a > 0) still correlates 1.
    """
    gen, train = np.asarray(gen_images), np.asarray(train_images)
    if gen.ndim != 3 or train.ndim != 3 or gen.shape[1:] != train.shape[1:]:
        raise InputError(f"images must be (N, H, W) of one size, got {gen.shape} and {train.shape}")
    gen_rows = _matrix(gen.reshape(len(gen), -1), "generated images", np.float32)
    train_rows = _matrix(train.reshape(len(train), -1), "training images", np.float32)
    return _nearest(gen_rows, train_rows, "correlation")


# --- copies ----------------------------------------------------------------------------------


def copy_threshold(test_to_train_similarity: Any, quantile: float = 0.95) -> float:
    """The similarity above which a generated image counts as a copy, calibrated on held-out real images.

    `test_to_train_similarity`: for each real held-out test image (never trained on), the similarity to its
    nearest training image (`nearest_training(test, train).similarity`, same features and metric as the
    generated images). The threshold is the ⌈quantile·(n + 1)⌉-th smallest of these n values (the
    split-conformal quantile): a generated image that is no closer to the training set than a fresh real
    image would be exceeds it with probability at most 1 − quantile. Rule: copy ⇔ similarity > threshold,
    i.e. closer to its nearest training image than `quantile` of held-out test images are to theirs.
    """
    values = np.sort(np.asarray(test_to_train_similarity, dtype=np.float64).ravel())
    if not 0 < quantile < 1:
        raise InputError(f"quantile must be in (0, 1), got {quantile}")
    if not np.isfinite(values).all():
        raise InputError("test similarities contain NaN or inf")
    rank = math.ceil(quantile * (len(values) + 1))  # 1-based
    if rank > len(values):
        need = math.ceil(quantile / (1 - quantile))
        raise InputError(f"{len(values)} held-out test images cannot calibrate quantile {quantile}: need ≥ {need}")
    return float(values[rank - 1])


class CopyRate(NamedTuple):
    """Share of generated images above the copy threshold, with its binomial confidence interval."""

    rate: float
    low: float
    high: float
    copies: int
    n: int
    threshold: float
    confidence: float


def copy_rate(gen_sims: Any, threshold: float, confidence: float = 0.95) -> CopyRate:
    """Share of generated images whose nearest-training similarity exceeds `threshold` (strictly), with a
    Wilson score interval (scipy `binomtest(...).proportion_ci(method="wilson")`). The interval covers the
    generated sample only, not the threshold's calibration noise, so it does not decide "above the nominal
    rate": a copy-free model lands above 5 % in 8 % (5,000 held-out) to 27 % (300 held-out) of runs by that
    rule. `copy_count_test` decides it."""
    from scipy.stats import binomtest

    sims = np.asarray(gen_sims, dtype=np.float64).ravel()
    if len(sims) == 0:
        raise InputError("no generated similarities to count copies in")
    copies = int((sims > threshold).sum())
    interval = binomtest(copies, len(sims)).proportion_ci(confidence_level=confidence, method="wilson")
    return CopyRate(
        copies / len(sims), float(interval.low), float(interval.high), copies, len(sims), threshold, confidence
    )


def copy_count_test(copies: int, n_generated: int, n_held_out: int, quantile: float = 0.95) -> float:
    """One-sided p-value that a model copies more than a copy-free one would, from the exact law of the copy
    count with the threshold calibrated as `copy_threshold` does.

    Assumption (exchangeability): a copy-free model's similarities to the training set are draws from the same
    continuous law as the held-out images'. The threshold is then the k-th smallest of n_cal such draws,
    k = ⌈quantile·(n_cal + 1)⌉, so the chance p that one generated image exceeds it is Beta(n_cal + 1 − k, k)
    and, given p, the count is Binomial(n_gen, p): the count is BetaBinomial(n_gen, n_cal + 1 − k, k)
    (scipy.stats.betabinom), which holds the threshold's calibration noise the Wilson interval leaves out."""
    from scipy.stats import betabinom

    if not 0 <= copies <= n_generated or n_held_out < 1:
        raise InputError(f"copy count {copies} of {n_generated} generated, {n_held_out} held-out: not a count")
    k = math.ceil(quantile * (n_held_out + 1))
    if k > n_held_out:
        raise InputError(f"{n_held_out} held-out test images cannot calibrate quantile {quantile}")
    return float(betabinom.sf(copies - 1, n_generated, n_held_out + 1 - k, k))


def similarity_test(gen_sims: Any, held_out_sims: Any) -> tuple[float, float]:
    """Two-sample Kolmogorov–Smirnov test (scipy `ks_2samp`, two-sided) of generated against held-out
    similarities to the training set: (statistic, p-value). Under the exchangeability `copy_count_test`
    assumes the two laws are one; a small p-value says they differ, in whichever direction the medians show
    (generated images farther from the training set than real ones is a difference too)."""
    from scipy.stats import ks_2samp

    result = ks_2samp(np.asarray(gen_sims, dtype=np.float64).ravel(), np.asarray(held_out_sims).ravel())
    return float(result.statistic), float(result.pvalue)


# --- memorization score ----------------------------------------------------------------------


def memorization_score(
    unet: Any,
    latents: Any,
    cond_embeds: Any,
    uncond_embeds: Any,
    scheduler: Any,
    timesteps: int = 50,
    guidance_scale: float = 7.5,
    first: int | None = None,
) -> np.ndarray:
    """Dutt et al.'s (after Wen et al.) memorization score of each row: the text-conditional noise
    prediction's pull, averaged over the sampling trajectory.

    From the initial noise `latents` (B, C, h, w), the classifier-free-guided sampling that generation
    uses runs for `timesteps` steps of (a copy of) `scheduler`; at every step t, with x_t the current latent,

        d_t = || ε(x_t, t, cond) − ε(x_t, t, uncond) ||₂    over all C·h·w latent elements,

    and the score is the mean of d_t over the steps (over the `first` steps only, if given; Wen et al.
    report that even the first step separates memorized prompts). Norm: the plain L2 norm of the whole
    latent difference, not divided by its size, as both papers' code computes it, so that thresholds
    from their papers carry over at the same latent size (64×64×4 for 512 px); it grows with √(C·h·w),
    so scores from different latent sizes are not comparable. Rows are independent: row i uses
    `cond_embeds[i]` (a (1, L, D) embedding is shared); for a per-prompt score, give a prompt several
    noise rows and average theirs (Dutt et al. use 4). Use a deterministic scheduler (DDIM, as both
    papers do) for a reproducible score; a stochastic one (DDPM) makes the trajectory random. Returns (B,)
    float64.
    """
    import torch

    if guidance_scale < 0:
        raise InputError(f"guidance_scale must be >= 0, got {guidance_scale}")
    parameter = next(unet.parameters())
    device, dtype = parameter.device, parameter.dtype
    x = torch.as_tensor(latents).to(device=device, dtype=dtype)
    if x.dim() != 4:
        raise InputError(f"latents must be (B, C, h, w), got {tuple(x.shape)}")
    batch = x.shape[0]
    cond = torch.as_tensor(cond_embeds).to(device=device, dtype=dtype).expand(batch, -1, -1)
    uncond = torch.as_tensor(uncond_embeds).to(device=device, dtype=dtype).expand(batch, -1, -1)
    scheduler = type(scheduler).from_config(scheduler.config)  # the caller's scheduler keeps its state
    scheduler.set_timesteps(timesteps, device=device)
    steps = scheduler.timesteps if first is None else scheduler.timesteps[:first]
    if len(steps) == 0:
        raise InputError(f"no sampling steps to average over (timesteps={timesteps}, first={first})")
    x = x * scheduler.init_noise_sigma
    distances = []
    with torch.no_grad():
        for t in steps:
            model_input = scheduler.scale_model_input(torch.cat([x, x]), t)
            noise = unet(model_input, t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            noise_uncond, noise_cond = noise.chunk(2)
            pull = noise_cond - noise_uncond
            distances.append(pull.float().flatten(1).norm(dim=1))  # (B,)
            x = scheduler.step(noise_uncond + guidance_scale * pull, t, x).prev_sample
    return torch.stack(distances, dim=1).mean(dim=1).double().cpu().numpy()
