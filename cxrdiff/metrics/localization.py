"""How well a heatmap points at the boxes: AUC-ROC, Top-1 and CNR, as the paper scores grounding.

Plain functions on a heatmap and a boolean mask of the same shape. A mask with no pixel inside or no
pixel outside makes every one of these undefined, so it is an `InputError`, never a NaN in a table.
"""

from __future__ import annotations

import math

import numpy as np

from cxrdiff.errors import InputError


def _check(heatmap, mask) -> tuple[np.ndarray, np.ndarray]:
    heat = np.asarray(heatmap, dtype=np.float64)
    inside = np.asarray(mask)
    if inside.dtype != bool:
        raise InputError(f"mask: expected a boolean array, got {inside.dtype}")
    if heat.shape != inside.shape:
        raise InputError(f"heatmap shape {heat.shape} differs from mask shape {inside.shape}")
    if not np.isfinite(heat).all():
        raise InputError("heatmap: contains NaN or infinite values")
    n_in = int(inside.sum())
    if n_in == 0:
        raise InputError("mask: empty (no pixel inside the boxes); the localization metrics are undefined")
    if n_in == inside.size:
        raise InputError("mask: full (no pixel outside the boxes); the localization metrics are undefined")
    return heat, inside


def auc_roc(heatmap, mask) -> float:
    """Exact pixel-level AUC-ROC of the heatmap as a score for "inside the boxes" (ties count half).

    Computed by the rank-sum (Mann-Whitney) identity, AUC = (R_in − n_in(n_in + 1)/2) / (n_in · n_out), with
    scipy's tie-averaged ranks: the same number as scikit-learn's `roc_auc_score` (tested against it), but
    2× faster on a 512² map and 7× on a 64² one, where sklearn's input checks dominate; the ground step
    scores one map per word per image.
    """
    from scipy.stats import rankdata

    heat, inside = _check(heatmap, mask)
    ranks = rankdata(heat.ravel())  # 1-based, ties share their average rank
    flat = inside.ravel()
    n_in = int(flat.sum())
    n_out = flat.size - n_in
    return float((ranks[flat].sum() - n_in * (n_in + 1) / 2.0) / (n_in * n_out))


def top1(heatmap, mask) -> float:
    """Is the highest pixel inside the boxes (1.0 or 0.0)?

    With several pixels tied at the maximum, the share of them inside: the expected Top-1 under a
    random choice among the ties, rather than numpy's first-in-memory pick, which favours the top left.
    """
    heat, inside = _check(heatmap, mask)
    top = heat == heat.max()
    return float(inside[top].mean())


def _unbiased_var(values: np.ndarray) -> float:
    return float(values.var(ddof=1)) if values.size > 1 else 0.0


def cnr(heatmap, mask, absolute: bool = False) -> float:
    """Contrast-to-noise ratio: (mean_in − mean_out) / sqrt(var_in + var_out), unbiased variances.

    Signed by default (the paper); ``absolute=True`` gives |CNR| as BioViL reports it. A region of one
    pixel has variance 0. A constant map has no contrast: 0.0. With no variance on either side but
    different means (a perfect two-level map): ±inf.
    """
    heat, inside = _check(heatmap, mask)
    if heat.max() == heat.min():  # exactly constant: no contrast (rounding in the means must not say otherwise)
        return 0.0
    values_in, values_out = heat[inside], heat[~inside]
    diff = float(values_in.mean() - values_out.mean())
    noise = math.sqrt(_unbiased_var(values_in) + _unbiased_var(values_out))
    value = diff / noise if noise > 0.0 else (0.0 if diff == 0.0 else math.copysign(math.inf, diff))
    return abs(value) if absolute else value
