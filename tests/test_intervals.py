"""Intervals and verdicts (`cxrdiff.metrics.intervals`) against known distributions and hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from cxrdiff.metrics import intervals as iv
from cxrdiff.metrics.intervals import Interval


def test_bootstrap_mean_covers_the_true_mean_with_the_normal_width():
    n = 400
    values = np.random.default_rng(1).normal(0.0, 1.0, n)
    interval = iv.bootstrap_mean(values, resamples=2000, seed=0, over="draws")
    assert interval.value == pytest.approx(values.mean())
    assert interval.low < 0.0 < interval.high
    expected_width = 2 * 1.96 / math.sqrt(n)  # σ = 1
    assert (interval.high - interval.low) == pytest.approx(expected_width, rel=0.15)
    assert interval.n == n and interval.seed == 0 and interval.resamples == 2000 and interval.level == 0.95
    assert interval.method == "bootstrap over draws, 2000 resamples, percentile"


def test_stratified_resampling_keeps_every_stratum_count():
    strata = np.array(["Edema"] * 3 + ["Atelectasis"] * 7 + ["Pneumothorax"] * 2 + ["Edema"] * 4)
    expected = {s: int(np.sum(strata == s)) for s in np.unique(strata)}
    seen = []

    def record(idx: np.ndarray) -> float:
        resampled = strata[idx]
        seen.append({s: int(np.sum(resampled == s)) for s in expected})
        assert np.array_equal(resampled, strata)  # position i keeps item i's stratum
        return float(len(np.unique(idx)))

    interval = iv.bootstrap(len(strata), record, strata=strata, resamples=300, seed=3, over="phrases")
    assert len(seen) == 301  # the value on the original indices, then every resample
    assert all(counts == expected for counts in seen)
    assert interval.high > interval.low  # items were really resampled, not just permuted
    assert "class-stratified" in interval.method


def test_unstratified_resampling_does_not_keep_counts():
    strata = np.array([0] * 10 + [1] * 10)
    counts = iv.resample_indices(20, 200, np.random.default_rng(0))
    assert len({int(np.sum(strata[row] == 0)) for row in counts}) > 1


def test_same_seed_same_interval_other_seed_different():
    values = np.random.default_rng(2).exponential(size=60)
    strata = np.arange(60) % 3
    first = iv.bootstrap_mean(values, strata, seed=7)
    assert iv.bootstrap_mean(values, strata, seed=7) == first
    other = iv.bootstrap_mean(values, strata, seed=8)
    assert (other.low, other.high) != (first.low, first.high)
    drawn = iv.bootstrap_mean(values, seed=None)
    assert drawn.seed is not None and iv.bootstrap_mean(values, seed=drawn.seed) == drawn  # recorded: repeatable


def test_undefined_resamples_are_dropped_and_counted():
    values = np.arange(31.0)

    def needs_item_0(idx: np.ndarray) -> float:  # undefined in the ~37 % of resamples that miss item 0
        return float(values[idx].mean()) if 0 in idx else float("nan")

    some = iv.bootstrap(31, needs_item_0, resamples=200)
    assert 100 < some.resamples < 160 and f"{200 - some.resamples} of 200 resamples dropped" in some.method
    assert some.has_bounds and some.low < some.value < some.high
    never = iv.bootstrap(31, lambda idx: float("nan"), resamples=50)
    assert not never.has_bounds and never.reason == "statistic undefined in 50 of 50 resamples"


def test_one_item_or_one_training_has_no_bounds():
    one = iv.bootstrap_mean([0.7])
    assert one.value == 0.7 and not one.has_bounds and not one.excludes_zero()
    assert one.text() == "0.70 (no interval: 1 items: nothing to resample)"
    single = iv.trainings_interval([0.4])
    assert (
        single.value == 0.4 and single.reason == "one training" and iv.verdict(single, 1) == "no verdict (one training)"
    )


def _difference(true_difference: float, seed: int) -> Interval:
    rng = np.random.default_rng(seed)
    a = rng.normal(0.5 + true_difference, 0.3, 150)  # per-phrase CNRs of model a
    b = rng.normal(0.5, 0.3, 150)
    return iv.bootstrap_difference(
        lambda idx: float(a[idx].mean()), lambda idx: float(b[idx].mean()), 150, paired=True, over="phrases"
    )


def test_verdict_reproduced_opposite_and_not_distinguishable():
    larger, smaller, equal = _difference(0.3, 0), _difference(-0.3, 0), _difference(0.0, 0)
    assert larger.low > 0 and smaller.high < 0 and equal.low < 0 < equal.high
    assert iv.verdict(larger, +1) == iv.REPRODUCED == "reproduced"
    assert iv.verdict(larger, -1) == iv.OPPOSITE == "opposite"
    assert iv.verdict(smaller, -1) == "reproduced" and iv.verdict(smaller, +1) == "opposite"
    assert iv.verdict(equal, +1) == iv.verdict(equal, -1) == "not distinguishable here"
    text = iv.verdict_text(equal, +1)
    assert text == f"not distinguishable here (difference {equal.text(2)}, bootstrap over phrases)"
    with pytest.raises(ValueError, match="expected_sign"):
        iv.verdict(equal, 0)


def test_paired_difference_of_identical_models_is_exactly_zero():
    cnr = np.random.default_rng(4).normal(size=80)
    same = iv.bootstrap_difference(
        lambda idx: float(cnr[idx].mean()), lambda idx: float(cnr[idx].mean()), 80, paired=True
    )
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    assert same.text() == "0.00 [0.00, 0.00]" and iv.verdict(same, 1) == "not distinguishable here"
    independent = iv.bootstrap_difference(
        lambda idx: float(cnr[idx].mean()), lambda idx: float(cnr[idx].mean()), 80, paired=False
    )
    assert independent.value == 0.0 and independent.low < 0 < independent.high  # resampled separately
    assert independent.n == (80, 80) and "independent sets" in independent.method


def test_trainings_interval_by_hand():
    interval = iv.trainings_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, 2) · s / √n, s = 1
    assert half == pytest.approx(2.484, abs=5e-4)
    assert (interval.value, interval.low, interval.high) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    assert interval.method == "t over 3 trainings" and interval.n == 3 and interval.seed is None


def test_trainings_difference_is_welch_as_scipy_computes_it():
    a, b = [0.92, 0.88, 0.95], [0.13, 0.30, 0.02]
    interval = iv.trainings_difference(a, b)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert interval.value == pytest.approx(np.mean(a) - np.mean(b))
    assert (interval.low, interval.high) == pytest.approx((ci.low, ci.high))
    assert iv.verdict(interval, +1) == "reproduced"


def test_difference_interval_chooses_trainings_else_bootstrap():
    boot = _difference(0.3, 1)
    over_trainings = iv.difference_interval([1.0, 1.2, 1.1], [0.1, 0.2], boot)
    assert over_trainings.method.startswith("Welch t over trainings (3 vs 2)")
    assert iv.difference_interval([1.0], [0.1, 0.2], boot) is boot
    assert iv.difference_interval([1.0], [0.1], lambda: boot) is boot
    bare = iv.difference_interval([1.0], [0.25])
    assert bare.value == 0.75 and not bare.has_bounds and iv.verdict(bare, 1).startswith("no verdict (fewer than 2")


def test_interval_round_trips_through_a_dict():
    interval = iv.bootstrap_difference(lambda i: 1.0, lambda i: float(i.mean()), 5, paired=False, n_items_b=7)
    assert Interval.from_dict(interval.as_dict()) == interval
    assert interval.as_dict()["n"] == [5, 7]


def test_frechet_reference_equals_scipy_frechet_distance():
    """The eigenvalue route gives the same distance as sqrtm of the covariance product, with fewer rows than
    dimensions (the Gram side) and more (the covariance side)."""
    from cxrdiff.metrics.fid import feature_statistics, frechet_distance

    rng = np.random.default_rng(3)
    real = rng.normal(size=(300, 40)) @ rng.normal(size=(40, 40))
    for n in (25, 400):
        fake = rng.normal(size=(n, 40)) * 1.3 + 0.2
        expected = frechet_distance(feature_statistics(real), feature_statistics(fake))
        assert iv.FrechetReference(real).distance(fake) == pytest.approx(expected, rel=1e-7, abs=1e-7)


def test_frechet_bootstrap_identical_and_shifted_sets():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 64))
    same = iv.frechet_bootstrap(real, real, seed=0)
    assert abs(same.value) < 1e-6
    assert same.has_bounds and same.low < same.value < same.high  # a normal interval contains its value
    assert same.resamples == iv.FRECHET_RESAMPLES and "real features fixed" in same.method
    shifted = iv.frechet_bootstrap(real, rng.normal(size=(200, 64)) + 0.5, seed=0)
    assert shifted.excludes_zero() and shifted.low > same.high and shifted.value > 64 * 0.25
    assert shifted.low < shifted.value < shifted.high


def test_frechet_difference_tells_a_shifted_model_from_a_faithful_one():
    rng = np.random.default_rng(1)
    real, faithful, other = (rng.normal(size=(200, 64)) for _ in range(3))
    shifted = rng.normal(size=(200, 64)) + 0.5
    worse = iv.frechet_difference(real, shifted, faithful, seed=0)
    assert iv.verdict(worse, +1) == "reproduced"
    alike = iv.frechet_difference(real, other, faithful, seed=0)
    assert iv.verdict(alike, +1) == "not distinguishable here"


def test_classifier_auc_cell_hides_aucs_from_too_few_positives():
    assert iv.MIN_POSITIVES == 5
    assert iv.classifier_auc_cell(4, 40, 100.0) == "too few (4)"
    assert iv.classifier_auc_cell(0, 40, float("nan")) == "too few (0)"
    assert iv.classifier_auc_cell(5, 40, 83.04) == "83.0"
    assert iv.classifier_auc_cell(9, 0, float("nan")) == "no negatives"


def test_zero_spread_over_trainings_has_no_bounds():
    """[0.20, 0.20] would 'exclude zero' and give a verdict from two identical trainings a side."""
    diff = iv.trainings_difference([0.5, 0.5], [0.3, 0.3])
    assert diff.value == pytest.approx(0.2) and not diff.has_bounds and diff.reason == "no spread observed"
    assert iv.verdict(diff, +1) == "no verdict (no spread observed)"
    same = iv.trainings_interval([0.5, 0.5])
    assert same.value == 0.5 and not same.has_bounds and same.reason == "no spread observed"
    assert iv.welch_p_value([0.5, 0.5], [0.3, 0.3]) is None


def test_welch_p_value_and_holm_by_hand():
    a, b = [0.92, 0.88, 0.95], [0.13, 0.30, 0.02]
    assert iv.welch_p_value(a, b) == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    # Holm: sorted 0.01, 0.03, 0.2 → 3·0.01, max(0.03, 2·0.03), max(0.06, 0.2)
    assert iv.holm([0.03, 0.2, 0.01]) == pytest.approx([0.06, 0.2, 0.03])
    assert iv.holm([0.04, 0.5]) == pytest.approx([0.08, 0.5])


def test_welch_power_at_the_readmes_numbers():
    """CNR difference −0.30, spreads 0.17 and 0.19 over trainings. 400,000 simulated experiments (a separate
    run, seed 1) gave 27.0 % at 3 v 3, 60.7 % at 5 v 5, 72.2 % at 6 v 6, 80.6 % at 7 v 7; the noncentral-t
    formula with the true spreads' df says 34 % and 64 %, too high at so few trainings."""
    assert iv.welch_power(-0.30, 0.17, 0.19, 3) == pytest.approx(0.270, abs=0.01)
    assert iv.welch_power(-0.30, 0.17, 0.19, 5) == pytest.approx(0.607, abs=0.01)
    assert iv.trainings_for_power(-0.30, 0.17, 0.19) == 7
    assert 0.02 < iv.welch_power(0.0, 0.17, 0.19, 3) < 0.05  # no difference: Welch at 3 v 3 is conservative (3.3 %)
    assert iv.trainings_for_power(0.0, 0.17, 0.19) is None
    assert iv.trainings_for_power(0.01, 0.17, 0.19) is None  # beyond 50 trainings per model


def test_paired_frechet_difference_resamples_the_same_rows():
    """Frozen and learnable sample the same prompts with the same noise: row i of each shares its prompt's
    spread, which cancels when one index array serves both (the paired interval is the narrower)."""
    rng = np.random.default_rng(5)
    real = rng.normal(size=(300, 16))
    prompt = rng.normal(size=(200, 16))  # what each prompt contributes to both models' images
    a = prompt + 0.3 * rng.normal(size=(200, 16))
    b = prompt + 0.3 * rng.normal(size=(200, 16)) + 0.1
    paired = iv.frechet_difference(real, a, b, seed=0, paired=True)
    independent = iv.frechet_difference(real, a, b, seed=0)
    assert paired.value == pytest.approx(independent.value) and paired.n == 200 and "paired" in paired.method
    assert (paired.high - paired.low) < 0.6 * (independent.high - independent.low)
    same = iv.frechet_difference(real, a, a, seed=0, paired=True)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="as many rows"):
        iv.frechet_difference(real, a, b[:100], paired=True)


def test_frechet_infinity_removes_the_small_n_bias():
    """Fake drawn from the real law: the true distance is 0, FD at n is biased up by about d²/(2n)-order terms;
    FD∞ (Chong & Forsyth's fit in 1/n) lands near 0 and well below FD at n."""
    rng = np.random.default_rng(6)
    real = rng.normal(size=(4000, 16))
    fake = rng.normal(size=(200, 16))
    at_n = iv.FrechetReference(real).distance(fake)
    infinity = iv.frechet_infinity(real, fake, seed=0)
    assert at_n > 0.3 and abs(infinity) < 0.5 * at_n  # over 10 draws: FD at 200 is 0.46, FD∞ -0.01 ± 0.09


def test_coverage_of_the_paired_cnr_bootstrap_and_of_welch():
    """Seeded Monte Carlo on synthetic data with a known truth. Paired, class-stratified bootstrap of a CNR
    difference over 124 phrases in 8 classes (shared phrase difficulty): covers the true mean difference in
    about 95 % of 200 experiments. Welch over 3 v 3 trainings (spreads 0.17 and 0.19): at least 95 % of 2,000
    (96.8 % here: at so few trainings Welch's df is conservative)."""
    rng = np.random.default_rng(7)
    classes = np.repeat(np.arange(8), [31, 23, 17, 15, 12, 10, 9, 7])  # 124 phrases, MS-CXR-like counts
    class_shift = np.linspace(-0.3, 0.4, 8)[classes]
    covered = 0
    for _ in range(200):
        difficulty = rng.normal(0.0, 0.5, 124)
        a = 0.6 + class_shift + difficulty + rng.normal(0, 0.2, 124)
        b = 0.5 + class_shift + difficulty + rng.normal(0, 0.2, 124)  # true difference 0.10
        seed = int(rng.integers(1e9))
        diff = iv.bootstrap_difference(lambda i, a=a: float(a[i].mean()), lambda i, b=b: float(b[i].mean()), 124,
                                       paired=True, strata=classes, resamples=200, seed=seed)  # fmt: skip
        covered += diff.low <= 0.10 <= diff.high
    assert 0.90 <= covered / 200 <= 0.99
    welch = 0
    for _ in range(2000):
        d = iv.trainings_difference(rng.normal(0.52, 0.17, 3), rng.normal(0.82, 0.19, 3))
        welch += d.low <= -0.30 <= d.high
    assert 0.94 <= welch / 2000 <= 0.98
