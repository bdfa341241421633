"""Localization metrics against values worked out by hand."""

import math

import numpy as np
import pytest

from cxrdiff.errors import InputError
from cxrdiff.metrics.localization import auc_roc, cnr, top1


def _square_mask(size=8, lo=2, hi=5):
    mask = np.zeros((size, size), dtype=bool)
    mask[lo:hi, lo:hi] = True
    return mask


def test_perfect_map_scores_one():
    mask = _square_mask()
    heat = mask.astype(float) + np.linspace(0, 0.1, mask.size).reshape(mask.shape)  # inside always higher
    assert auc_roc(heat, mask) == 1.0
    assert top1(heat, mask) == 1.0
    assert cnr(heat, mask) > 0


def test_inverted_map_scores_zero():
    mask = _square_mask()
    heat = -(mask.astype(float) + np.linspace(0, 0.1, mask.size).reshape(mask.shape))
    assert auc_roc(heat, mask) == 0.0
    assert top1(heat, mask) == 0.0
    assert cnr(heat, mask) < 0
    assert cnr(heat, mask, absolute=True) == pytest.approx(-cnr(heat, mask))


def test_auc_by_hand():
    # inside scores {3, 1}, outside {2, 0}: pairs (3>2, 3>0, 1<2, 1>0) → 3 of 4 ordered correctly
    heat = np.array([[3.0, 1.0], [2.0, 0.0]])
    mask = np.array([[True, True], [False, False]])
    assert auc_roc(heat, mask) == pytest.approx(0.75)
    # a tie between inside and outside counts half: inside {1, 1}, outside {1, 0} → (0.5 + 1 + 0.5 + 1) / 4
    heat = np.array([[1.0, 1.0], [1.0, 0.0]])
    assert auc_roc(heat, mask) == pytest.approx(0.75)


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_sklearn_with_ties(seed):
    # the rank-sum identity against scikit-learn's ROC-curve computation, on maps with many ties
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    heat = rng.integers(0, 6, size=(16, 24)).astype(float)
    mask = rng.random((16, 24)) < 0.3
    assert auc_roc(heat, mask) == pytest.approx(roc_auc_score(mask.ravel(), heat.ravel()), abs=1e-12)


def test_cnr_by_hand():
    # inside {4, 6}: mean 5, unbiased var 2; outside {0, 1, 2}: mean 1, unbiased var 1 → 4 / sqrt(3)
    heat = np.array([4.0, 6.0, 0.0, 1.0, 2.0])
    mask = np.array([True, True, False, False, False])
    assert cnr(heat, mask) == pytest.approx(4 / math.sqrt(3))
    assert cnr(-heat, mask) == pytest.approx(-4 / math.sqrt(3))
    assert cnr(-heat, mask, absolute=True) == pytest.approx(4 / math.sqrt(3))


def test_cnr_single_pixel_region_has_zero_variance():
    # inside {9}: var 0 by definition; outside {1, 3}: mean 2, var 2 → 7 / sqrt(2)
    heat = np.array([9.0, 1.0, 3.0])
    mask = np.array([True, False, False])
    assert cnr(heat, mask) == pytest.approx(7 / math.sqrt(2))


def test_constant_map_is_defined():
    mask = _square_mask()
    heat = np.full(mask.shape, 0.3)
    assert auc_roc(heat, mask) == 0.5
    assert cnr(heat, mask) == 0.0
    assert top1(heat, mask) == pytest.approx(mask.mean())  # every pixel ties for the top


def test_two_level_map_has_infinite_cnr_not_nan():
    mask = _square_mask()
    assert cnr(mask.astype(float), mask) == math.inf
    assert cnr(-mask.astype(float), mask) == -math.inf


def test_top1_tie_counts_share_inside():
    heat = np.array([[5.0, 5.0], [5.0, 1.0]])
    mask = np.array([[True, False], [False, True]])
    assert top1(heat, mask) == pytest.approx(1 / 3)


@pytest.mark.parametrize("fill", [False, True])
@pytest.mark.parametrize("metric", [auc_roc, top1, cnr])
def test_empty_or_full_mask_is_an_input_error(metric, fill):
    heat = np.arange(16.0).reshape(4, 4)
    with pytest.raises(InputError, match="empty" if not fill else "full"):
        metric(heat, np.full((4, 4), fill))


def test_shape_and_type_errors():
    with pytest.raises(InputError, match="shape"):
        auc_roc(np.zeros((4, 4)), _square_mask(5, 1, 2))
    with pytest.raises(InputError, match="boolean"):
        cnr(np.zeros((4, 4)), np.eye(4))
    with pytest.raises(InputError, match="NaN"):
        top1(np.full((2, 2), np.nan), np.eye(2, dtype=bool))
