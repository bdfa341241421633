"""Classifier check: AUC against hand-counted pairs, class aliases, and the trainable phantom classifier."""

from __future__ import annotations

import numpy as np
import pytest

from cxrdiff.errors import InputError
from cxrdiff.metrics import classifier as C


def test_auc_against_hand_made_scores():
    # positives 0.9 0.8 0.4 vs negatives 0.1 0.5: 5 of 6 pairs ordered → 83.33 %
    # ties count half: 0.5 vs 0.5 → (1 + 0.5) / 2 = 75 %
    out = C.class_aucs({"Edema": [0.9, 0.8, 0.4], "Pneumonia": [0.5, 0.9]}, {"Edema": [0.1, 0.5], "Pneumonia": [0.5]})
    assert out["Edema"].value == pytest.approx(500 / 6)
    assert out["Pneumonia"].value == pytest.approx(75.0)
    assert out["Edema"].protocol == {"positives": 3, "negatives": 2}
    # fewer than 5 positives: the AUC is kept (metrics.json) but has no interval and no place in the Average
    assert out["Edema"].interval is None and "Average" not in out
    empty = C.class_aucs({"Edema": []}, {"Edema": [0.1]})
    assert np.isnan(empty["Edema"].value) and "Average" not in empty


def test_auc_interval_and_average_from_five_or_more_positives():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    neg = rng.normal(size=40)
    pos = {"Edema": rng.normal(1.0, 1.0, 30), "Pneumonia": rng.normal(0.0, 1.0, 6), "Atelectasis": rng.normal(2, 1, 3)}
    out = C.class_aucs(pos, {c: neg for c in pos}, seed=1, resamples=400)
    for c in pos:  # the rank-sum AUC is scikit-learn's
        expected = 100 * roc_auc_score(np.r_[np.ones(len(pos[c])), np.zeros(40)], np.r_[pos[c], neg])
        assert out[c].value == pytest.approx(expected)
    edema, pneumonia = out["Edema"].interval, out["Pneumonia"].interval
    assert edema["low"] < out["Edema"].value < edema["high"] and edema["low"] > 50  # a clear signal
    assert pneumonia["low"] < 50 < pneumonia["high"]  # no signal, 6 positives: wide, straddles chance
    assert edema["high"] - edema["low"] < pneumonia["high"] - pneumonia["low"]
    assert out["Atelectasis"].interval is None  # 3 positives: too few
    assert out["Average"].value == pytest.approx((out["Edema"].value + out["Pneumonia"].value) / 2)
    assert out["Average"].protocol == {"classes": 2, "positives": 36, "negatives": 40}  # Edema 30 + Pneumonia 6
    assert out["Average"].interval["low"] < out["Average"].value


class MeanBrightness:
    """A hand-made classifier: 'Effusion' score = mean of the bottom half, 'Cardiomegaly' = of the top half."""

    name = "hand-made"
    classes = ("Cardiomegaly", "Effusion")

    def scores(self, images):
        h = images.shape[1] // 2
        return np.stack([images[:, :h].mean((1, 2)), images[:, h:].mean((1, 2))], axis=1)


def test_check_maps_pleural_effusion_to_effusion():
    rng = np.random.default_rng(0)
    dark = rng.integers(0, 100, (5, 8, 8)).astype(np.uint8)
    effusion = dark.copy()
    effusion[:, 4:] += 100  # bright bottom half
    out = C.classifier_check(MeanBrightness(), {"Pleural Effusion": effusion, "Cardiomegaly": dark}, dark)
    assert out["Pleural Effusion"].value == pytest.approx(100.0)
    assert out["Cardiomegaly"].value == pytest.approx(50.0)  # same images both sides: all ties
    assert "Edema" not in out  # the classifier has no such class
    assert out["Pleural Effusion"].name == "AUC (hand-made)"
    with pytest.raises(InputError, match="No Finding"):
        C.classifier_check(MeanBrightness(), {"Cardiomegaly": dark}, dark[:0])


def _blobs(seed: int, n: int, size: int = 32):
    """Class 0: a bright top-left square; class 1: a bright bottom-right one; label 'No Finding' if neither."""
    rng = np.random.default_rng(seed)
    images = rng.normal(80, 20, (n, size, size))
    labels = rng.integers(0, 2, (n, 2)).astype(np.float32)
    q = size // 4
    images[labels[:, 0] == 1, q : 2 * q, q : 2 * q] += 90
    images[labels[:, 1] == 1, 2 * q : 3 * q, 2 * q : 3 * q] += 90
    no_finding = (labels.sum(1) == 0).astype(np.float32)[:, None]
    return np.clip(images, 0, 255).astype(np.uint8), np.concatenate([labels, no_finding], 1)


def test_phantom_classifier_learns_and_is_seeded(tmp_path):
    import torch

    classes = ("Atelectasis", "Edema", "No Finding")
    x, y = _blobs(0, 160)
    model = C.train_phantom_classifier(x, y, classes=classes, epochs=8, seed=1, width=8)
    xt, yt = _blobs(1, 80)
    scores = model.scores(xt)
    assert scores.shape == (80, 3)
    from sklearn.metrics import roc_auc_score

    for k in range(3):
        assert roc_auc_score(yt[:, k], scores[:, k]) > 0.9
    feats = model.features(torch.from_numpy(xt[:4]).float()[:, None] / 255.0)
    assert tuple(feats.shape) == (4, 2 * 4 * model.width)  # mean and max of the last feature map
    again = C.train_phantom_classifier(x, y, classes=classes, epochs=8, seed=1, width=8)
    np.testing.assert_allclose(again.scores(xt), scores, rtol=1e-5, atol=1e-5)
    path = model.save(tmp_path / "clf.safetensors")
    loaded = C.PhantomClassifier.load(path)
    assert loaded.classes == classes and loaded.cache_key == model.cache_key and loaded.pool == "mean-max"
    np.testing.assert_allclose(loaded.scores(xt[:5]), scores[:5], rtol=1e-6)
    with pytest.raises(InputError, match="labels"):
        C.train_phantom_classifier(x, y[:, :2], classes=classes)


def test_loss_targets_blank_is_negative_uncertain_is_left_out():
    labels = np.array([[1.0, 0.0, np.nan, -1.0]], dtype=np.float32)
    targets, weights = C.loss_targets(labels)
    np.testing.assert_array_equal(targets, [[1, 0, 0, 0]])
    np.testing.assert_array_equal(weights, [[1, 1, 1, 0]])


def test_no_finding_images_are_negatives_when_findings_are_blank():
    """CheXpert leaves unmentioned findings blank: a No-Finding image has blanks, never 0.0. Trained on such
    labels, the classifier must still score No-Finding images below the class's images."""
    from sklearn.metrics import roc_auc_score

    classes = ("Atelectasis", "Edema", "No Finding")
    x, y = _blobs(0, 160)
    y[:, :2][y[:, :2] == 0] = np.nan  # only positives written, as in a CheXpert table
    model = C.train_phantom_classifier(x, y, classes=classes, epochs=8, seed=1, width=8)
    xt, yt = _blobs(1, 80)
    scores = model.scores(xt)
    no_finding = yt[:, 2] == 1
    for k in range(2):
        keep = (yt[:, k] == 1) | no_finding
        assert roc_auc_score(yt[keep, k], scores[keep, k]) > 0.9
