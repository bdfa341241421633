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
    """Exact pixel-level AUC-ROC of the heatmap as a score for "inside the boxes" (ties count half)."""
    from sklearn.metrics import roc_auc_score

    heat, inside = _check(heatmap, mask)
    return float(roc_auc_score(inside.ravel(), heat.ravel()))


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
