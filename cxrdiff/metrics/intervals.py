"""Uncertainty for every measured number: one place, one `Interval` type, one verdict rule.

A reproduction verdict is only as good as the spread it is judged against. Two kinds of spread occur here:

- over items (phrases grounded, images generated) within one trained model: a percentile bootstrap that
  resamples item indices with replacement, within each stratum (e.g. each phrase's MS-CXR class) when strata
  are given, so every class keeps its count and a class average keeps its weights;
- over trainings (the paper's "three different trainings"): a Student-t interval of the mean, and Welch's
  t interval for a difference of two models' means.

Every interval records how it was made (`method`, `n`, `seed`, the resamples used), so a report can print
the method beside the number. Where no interval can be computed (one item, one training) the value is kept
and the bounds are None, with the reason: a degenerate [v, v] would wrongly read as "excludes zero".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

LEVEL = 0.95
RESAMPLES = 1000
FRECHET_RESAMPLES = 200  # each FD resample is a covariance and an eigen-decomposition: fewer, still seconds
MIN_POSITIVES = 5  # a classifier AUC from fewer positive images is shown as "too few (n)", never as a number
MIN_PHRASES = 10  # a class's interval from fewer phrases covers 50-90 %, not 95 %: shown as "too few (n)"
MIN_RESAMPLES = 200  # fewer resamples make the 2.5 % and 97.5 % percentiles too noisy to report
POWER = 0.80  # the power a planned number of trainings should reach

REPRODUCED = "reproduced"
OPPOSITE = "opposite"
NOT_DISTINGUISHABLE = "not distinguishable here"
NO_VERDICT = "no verdict"  # a difference without bounds (one training, no spread observed): never a verdict word

Statistic = Callable[[np.ndarray], float]  # resampled item indices (n,) → one number (nan: undefined here)


@dataclasses.dataclass(frozen=True)
class Interval:
    """A measured value with its confidence interval and how the interval was made.

    `low`/`high` are None when no interval could be computed; `reason` then says why (e.g. "one training").
    `method` starts with a short name, then details after ", " (e.g. "bootstrap over phrases, class-stratified,
    1000 resamples, percentile"); `short_method` is the part before the first comma. `n` counts items or
    trainings (a tuple of two for a difference of independent sets); `resamples` is how many bootstrap
    resamples gave a finite statistic (None for t intervals).
    """

    value: float
    low: float | None
    high: float | None
    level: float = LEVEL
    method: str = ""
    n: int | tuple[int, int] = 0
    seed: int | None = None
    resamples: int | None = None
    reason: str = ""

    @property
    def has_bounds(self) -> bool:
        return self.low is not None and self.high is not None

    @property
    def short_method(self) -> str:
        return self.method.split(",", 1)[0]

    def excludes_zero(self) -> bool:
        """True when the whole interval lies strictly on one side of zero (never without bounds)."""
        return self.has_bounds and (self.low > 0 or self.high < 0)

    def text(self, digits: int = 2) -> str:
        """E.g. "0.52 [0.41, 0.63]"; without bounds "0.52 (no interval: one training)"."""
        value = _number(self.value, digits)
        if not self.has_bounds:
            return f"{value} (no interval: {self.reason or 'not computed'})"
        return f"{value} [{_number(self.low, digits)}, {_number(self.high, digits)}]"

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["n"] = list(self.n) if isinstance(self.n, tuple) else self.n
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Interval:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if isinstance(kwargs.get("n"), list):
            kwargs["n"] = tuple(kwargs["n"])
        return cls(**kwargs)


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def _without_bounds(value: float, method: str, n: Any, reason: str, **extra: Any) -> Interval:
    return Interval(float(value), None, None, method=method, n=n, reason=reason, **extra)


# --- resampling ------------------------------------------------------------------------------


def _seed(seed: int | None) -> int:
    """The seed actually used: a given one, or fresh entropy (recorded, so the run can be repeated)."""
    return int(np.random.SeedSequence().entropy) if seed is None else int(seed)


def resample_indices(
    n_items: int, resamples: int, rng: np.random.Generator, strata: Sequence[Any] | np.ndarray | None = None
) -> np.ndarray:
    """(resamples, n_items) item indices drawn with replacement; with `strata`, within each stratum.

    Stratified draws keep every stratum's count: position i of every resample holds an item of the same
    stratum as item i, so `strata[indices[r]]` equals `strata` for every r.
    """
    if strata is None:
        return rng.integers(0, n_items, size=(resamples, n_items))
    strata = np.asarray(strata)
    if strata.shape != (n_items,):
        raise ValueError(f"strata must have one entry per item ({n_items}), got shape {strata.shape}")
    # scipy.stats.bootstrap has no strata, hence this loop over strata.
    out = np.empty((resamples, n_items), dtype=np.int64)
    for stratum in np.unique(strata):  # sorted, so the draw order (and the result) is fixed by the seed
        members = np.flatnonzero(strata == stratum)
        out[:, members] = members[rng.integers(0, len(members), size=(resamples, len(members)))]
    return out


def _percentile(
    value: float, draws: np.ndarray, level: float, method: str, n: Any, seed: int, requested: int
) -> Interval:
    finite = draws[np.isfinite(draws)]
    if len(finite) < 2:
        return _without_bounds(
            value,
            method,
            n,
            f"statistic undefined in {requested - len(finite)} of {requested} resamples",
            seed=seed,
            resamples=len(finite),
        )
    if len(finite) < requested:
        method += f" ({requested - len(finite)} of {requested} resamples dropped: statistic undefined)"
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return Interval(float(value), float(low), float(high), level, method, n, seed, len(finite))


@dataclasses.dataclass(frozen=True)
class Resampling:
    """The options `bootstrap` and `bootstrap_difference` share after the strata: how many resamples, the
    level, the seed (None: fresh entropy, recorded), and the words for an item and a stratum in the method."""

    resamples: int = RESAMPLES
    level: float = LEVEL
    seed: int | None = 0
    over: str = "items"
    strata_name: str = "class"

    def method(self, strata: Any, paired: bool | None = None) -> str:
        parts = [f"bootstrap over {self.over}"]
        if paired is not None:
            parts.append("paired" if paired else "independent sets")
        if strata is not None:
            parts.append(f"{self.strata_name}-stratified")
        return ", ".join([*parts, f"{self.resamples} resamples", "percentile"])


def bootstrap(
    n_items: int,
    statistic: Statistic,
    strata: Sequence[Any] | np.ndarray | None = None,
    *args: Any,
    **options: Any,
) -> Interval:
    """Percentile bootstrap of `statistic` over items: the value is `statistic(arange(n))`, the interval the
    central `level` of `statistic(indices)` over `resamples` resampled index arrays (`args`/`options`: the
    fields of `Resampling`, in its order).

    The statistic sees indices, not values, so one function serves a mean of per-phrase CNRs, a class
    average, or a Fréchet distance recomputed on resampled feature rows. Resamples where it returns nan
    (e.g. a class it needs is absent) are dropped and the count kept in the method and `resamples`.
    Fewer than 2 items: the value without bounds (every resample would be the same item).
    """
    how = Resampling(*args, **options)
    seed = _seed(how.seed)
    method = how.method(strata)
    value = float(statistic(np.arange(n_items))) if n_items > 0 else float("nan")
    if n_items < 2:
        return _without_bounds(value, method, n_items, f"{n_items} {how.over}: nothing to resample", seed=seed)
    indices = resample_indices(n_items, how.resamples, np.random.default_rng(seed), strata)
    draws = np.array([statistic(row) for row in indices], dtype=np.float64)
    return _percentile(value, draws, how.level, method, n_items, seed, how.resamples)


def bootstrap_mean(
    values: Sequence[float] | np.ndarray, strata: Sequence[Any] | np.ndarray | None = None, *args: Any, **options: Any
) -> Interval:
    """Bootstrap interval of the mean of per-item `values` (e.g. per-phrase CNRs); the other arguments are
    `bootstrap`'s. With `strata` each class keeps its count, so this is the sample-weighted class average's
    interval. Values must be finite."""
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"bootstrap_mean: {int(np.sum(~np.isfinite(values)))} non-finite values; drop them first")
    return bootstrap(len(values), lambda idx: float(values[idx].mean()), strata, *args, **options)


def bootstrap_difference(
    a: Statistic,
    b: Statistic,
    n_items: int,
    paired: bool,
    n_items_b: int | None = None,
    strata: Sequence[Any] | np.ndarray | None = None,
    strata_b: Sequence[Any] | np.ndarray | None = None,
    **options: Any,
) -> Interval:
    """Bootstrap interval of a − b (`options`: the fields of `Resampling`).

    Paired (the same phrases grounded by two models): one index array per resample serves both, so the
    items' own difficulty cancels. Independent (two image sets): each side is resampled separately
    (`n_items_b`, `strata_b` for b; default: the same as a's).
    """
    how = Resampling(**options)
    seed = _seed(how.seed)
    method = how.method(strata, paired)
    n_b = n_items if (paired or n_items_b is None) else n_items_b
    strata_b = strata if (paired or strata_b is None) else strata_b
    n = n_items if paired else (n_items, n_b)
    if min(n_items, n_b) < 1:
        return _without_bounds(float("nan"), method, n, "no items", seed=seed)
    value = float(a(np.arange(n_items))) - float(b(np.arange(n_b)))
    if min(n_items, n_b) < 2:
        return _without_bounds(value, method, n, f"fewer than 2 {how.over}: nothing to resample", seed=seed)
    rng = np.random.default_rng(seed)
    idx_a = resample_indices(n_items, how.resamples, rng, strata)
    if paired:
        draws = np.array([a(row) - b(row) for row in idx_a], dtype=np.float64)
    else:
        idx_b = resample_indices(n_b, how.resamples, rng, strata_b)
        draws = np.array([a(ra) - b(rb) for ra, rb in zip(idx_a, idx_b, strict=True)], dtype=np.float64)
    return _percentile(value, draws, how.level, method, n, seed, how.resamples)


# --- over trainings --------------------------------------------------------------------------


def trainings_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean over trainings with a Student-t interval (sample std, ddof 1; df = n − 1). One training: the value
    without bounds (a single training says nothing about how much another would differ)."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    method = f"t over {n} trainings"
    if n < 2:
        value = float(values[0]) if n else float("nan")
        return _without_bounds(value, method, n, "one training" if n else "no trainings")
    mean = float(values.mean())
    if values.std(ddof=1) == 0.0:  # every training gave the same number: [m, m] would read as "no uncertainty"
        return _without_bounds(mean, method, n, "no spread observed")
    half = float(stats.t.ppf((1 + level) / 2, n - 1) * values.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, level, method, n)


def trainings_difference(a_values: Sequence[float], b_values: Sequence[float], level: float = LEVEL) -> Interval:
    """Welch's t interval of mean(a) − mean(b) over trainings (unequal variances, Welch–Satterthwaite df).
    Needs at least 2 trainings on each side; otherwise the difference without bounds."""
    from scipy import stats

    a = np.asarray(a_values, dtype=np.float64)
    b = np.asarray(b_values, dtype=np.float64)
    method = f"Welch t over trainings ({len(a)} vs {len(b)})"
    n = (len(a), len(b))
    if min(n) < 1:
        return _without_bounds(float("nan"), method, n, "no trainings on one side")
    value = float(a.mean() - b.mean())
    if min(n) < 2:
        return _without_bounds(value, method, n, "fewer than 2 trainings on one side")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:  # every training gave the same number on both sides: a [v, v] would read as "excludes zero"
        return _without_bounds(value, method, n, "no spread observed")
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf((1 + level) / 2, df) * se)
    return Interval(value, value - half, value + half, level, method, n)


def difference_interval(
    a_trainings: Sequence[float],
    b_trainings: Sequence[float],
    bootstrap_diff: Interval | Callable[[], Interval] | None = None,
    level: float = LEVEL,
) -> Interval:
    """The interval a verdict on a − b should use: over trainings when both sides have ≥ 2 trainings (the
    spread the paper's ± describes), otherwise the bootstrap over items (`bootstrap_diff`, an Interval or a
    function making one, only called when needed). Its `method` says which was used."""
    if min(len(a_trainings), len(b_trainings)) >= 2:
        return trainings_difference(a_trainings, b_trainings, level)
    if bootstrap_diff is None:
        n = (len(a_trainings), len(b_trainings))
        value = float(np.mean(a_trainings) - np.mean(b_trainings)) if min(n) else float("nan")
        return _without_bounds(value, "no interval", n, "fewer than 2 trainings on one side and no bootstrap given")
    return bootstrap_diff() if callable(bootstrap_diff) else bootstrap_diff


# --- verdicts --------------------------------------------------------------------------------


def verdict(diff: Interval, expected_sign: int) -> str:
    """The verdict on a − b: "reproduced" when its interval excludes zero on the expected side (+1: a > b
    expected, −1: a < b), "opposite" when it excludes zero on the other side, else "not distinguishable here".
    No bounds (one training, one item, no spread observed): "no verdict (reason)", never a verdict word."""
    if expected_sign not in (1, -1):
        raise ValueError(f"expected_sign must be +1 or -1, got {expected_sign!r}")
    if not diff.has_bounds:
        return f"{NO_VERDICT} ({diff.reason or 'no interval'})"
    if not diff.excludes_zero():
        return NOT_DISTINGUISHABLE
    side = 1 if diff.low > 0 else -1
    return REPRODUCED if side == expected_sign else OPPOSITE


def verdict_text(diff: Interval, expected_sign: int, digits: int = 2, what: str = "difference") -> str:
    """The verdict with its evidence, e.g. "not distinguishable here (difference 0.04 [-0.08, 0.15],
    bootstrap over phrases)"."""
    method = f", {diff.short_method}" if diff.short_method else ""
    return f"{verdict(diff, expected_sign)} ({what} {diff.text(digits)}{method})"


def welch_p_value(a_values: Sequence[float], b_values: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t test of mean(a) = mean(b) (scipy); None without 2 trainings a side or
    without spread."""
    from scipy import stats

    a, b = np.asarray(a_values, dtype=np.float64), np.asarray(b_values, dtype=np.float64)
    if min(len(a), len(b)) < 2 or a.var(ddof=1) + b.var(ddof=1) == 0.0:
        return None
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error over the claims made together). Hand-written in
    four lines: scipy offers only false-discovery-rate control (`false_discovery_control`)."""
    order = np.argsort(p_values)
    adjusted, running = np.empty(len(p_values)), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * float(p_values[i])))
        adjusted[i] = running
    return adjusted.tolist()


def welch_power(
    difference: float, sd_a: float, sd_b: float, n_per_model: int, level: float = LEVEL, draws: int = 20_000
) -> float:
    """Power of the two-sided Welch test at 1 − `level` with `n_per_model` trainings on each side, if the true
    difference and spreads are the given ones and trainings vary normally: the share of `draws` simulated
    experiments (seeded, so fixed) that scipy's Welch test rejects. Simulated, not the noncentral-t formula:
    with 3 trainings the formula (true spreads' df) says 34 % where the test, whose df is estimated, has 27 %."""
    from scipy import stats

    n = int(n_per_model)
    if n < 2 or sd_a**2 + sd_b**2 == 0.0:
        return float("nan")
    rng = np.random.default_rng(0)
    a = rng.normal(difference, sd_a, size=(draws, n))
    b = rng.normal(0.0, sd_b, size=(draws, n))
    p = stats.ttest_ind(a, b, axis=1, equal_var=False).pvalue
    return float(np.mean(p < 1.0 - level))


def trainings_for_power(
    difference: float, sd_a: float, sd_b: float, power: float = POWER, level: float = LEVEL, most: int = 50
) -> int | None:
    """The fewest trainings per model whose Welch test reaches `power` at this difference and spread (None:
    more than `most`, or no difference)."""
    if difference == 0.0 or not math.isfinite(difference):
        return None
    low, high = 2, most  # power rises with n: bisect for the smallest n that reaches it
    if welch_power(difference, sd_a, sd_b, high, level) < power:
        return None
    while low < high:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if welch_power(difference, sd_a, sd_b, middle, level) < power else (low, middle)
    return low


# --- Fréchet distance ------------------------------------------------------------------------


class FrechetReference:
    """The Fréchet distance of any set of feature rows to one fixed real set, fast enough to bootstrap.

    FD = |μr − μf|² + tr Σr + tr Σf − 2 tr √(Σr Σf), and tr √(Σr Σf) = tr √(A Σf A) with A = √Σr (the same
    eigenvalues). With Xc the centred generated rows, A Σf A = Yᵀ Y / (n − 1) for Y = Xc A, whose non-zero
    eigenvalues are those of the smaller of Y Yᵀ and Yᵀ Y: one matrix product and one symmetric eigen-
    decomposition of min(n, d)² per set, instead of scipy's general `sqrtm` of a d × d product (seconds at
    Inception's 2048 dimensions). Written here because no library offers a resampling-friendly FD; a test
    checks it against `metrics.fid.frechet_distance`."""

    def __init__(self, real_features: Any) -> None:
        real = np.asarray(real_features, dtype=np.float64)
        self.mean = real.mean(axis=0)
        cov = np.atleast_2d(np.cov(real, rowvar=False))
        values, vectors = np.linalg.eigh(cov)
        self.sqrt_cov = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T  # (d, d), symmetric
        self.trace = float(np.trace(cov))

    def distance(self, fake_features: Any) -> float:
        fake = np.asarray(fake_features, dtype=np.float64)
        n = len(fake)
        centred = fake - fake.mean(axis=0)  # (n, d)
        y = centred @ self.sqrt_cov  # (n, d)
        gram = (y @ y.T) if n <= y.shape[1] else (y.T @ y)  # (min(n, d), min(n, d))
        eigen = np.clip(np.linalg.eigvalsh(gram / (n - 1)), 0.0, None)
        trace_fake = float((centred**2).sum() / (n - 1))
        mean_term = float(((self.mean - fake.mean(axis=0)) ** 2).sum())
        return mean_term + self.trace + trace_fake - 2.0 * float(np.sqrt(eigen).sum())


def _normal(value: float, draws: np.ndarray, level: float, method: str, n: Any, seed: int) -> Interval:
    """The normal bootstrap interval, value ± z · sd(draws): used for Fréchet distances, whose resampled
    values sit above the value (a resample with repeated rows looks less like the real set), so a percentile
    interval need not even contain it; the spread is still the bootstrap's."""
    from scipy import stats

    finite = draws[np.isfinite(draws)]
    if len(finite) < 2:
        return _without_bounds(value, method, n, "too few finite resamples", seed=seed, resamples=len(finite))
    half = float(stats.norm.ppf((1 + level) / 2) * finite.std(ddof=1))
    return Interval(float(value), value - half, value + half, level, method, n, seed, len(finite))


def frechet_bootstrap(
    real_features: Any,
    fake_features: Any,
    resamples: int = FRECHET_RESAMPLES,
    level: float = LEVEL,
    seed: int | None = 0,
) -> Interval:
    """Interval of the Fréchet distance over the generated images: the fake rows are resampled, the real rows
    are not (the real set is the fixed reference every model is measured against; the interval is the spread
    due to which images a model happened to generate). A normal interval from the bootstrap s.d. (see
    `_normal` for why not percentiles)."""
    seed = _seed(seed)
    reference = FrechetReference(real_features)
    fake = np.asarray(fake_features, dtype=np.float64)
    method = f"bootstrap over generated images, {resamples} resamples, normal (± z·s.d.), real features fixed"
    value = reference.distance(fake)
    if len(fake) < 3:
        return _without_bounds(value, method, len(fake), "fewer than 3 generated images", seed=seed)
    rows = resample_indices(len(fake), resamples, np.random.default_rng(seed))
    draws = np.array([reference.distance(fake[r]) for r in rows])
    return _normal(value, draws, level, method, len(fake), seed)


def frechet_difference(
    real_features: Any,
    fake_a: Any,
    fake_b: Any,
    resamples: int = FRECHET_RESAMPLES,
    level: float = LEVEL,
    seed: int | None = 0,
    paired: bool = False,
) -> Interval:
    """Interval of FD(real, a) − FD(real, b): two generated sets against one real set, the real features fixed;
    a normal interval from the bootstrap s.d. of the difference. Paired (row i of a and of b drawn from the same
    prompt and noise, as the report samples every run): one index array per resample serves both, so the
    prompts' own spread cancels; otherwise each set is resampled independently. At equal n the two distances'
    O(d/n) upward bias is nearly the same and cancels in the difference, so this interval holds its level where
    one distance's does not (`frechet_bootstrap`)."""
    seed = _seed(seed)
    reference = FrechetReference(real_features)
    a, b = np.asarray(fake_a, dtype=np.float64), np.asarray(fake_b, dtype=np.float64)
    if paired and len(a) != len(b):
        raise ValueError(f"a paired Fréchet difference needs as many rows on each side, got {len(a)} and {len(b)}")
    design = "paired" if paired else "independent sets"
    method = f"bootstrap over generated images, {design}, {resamples} resamples, normal (± z·s.d.), real features fixed"
    value = reference.distance(a) - reference.distance(b)
    n = len(a) if paired else (len(a), len(b))
    if min(len(a), len(b)) < 3:
        return _without_bounds(value, method, n, "fewer than 3 generated images", seed=seed)
    rng = np.random.default_rng(seed)
    rows_a = resample_indices(len(a), resamples, rng)
    rows_b = rows_a if paired else resample_indices(len(b), resamples, rng)
    draws = np.array(
        [reference.distance(a[ra]) - reference.distance(b[rb]) for ra, rb in zip(rows_a, rows_b, strict=True)]
    )
    return _normal(value, draws, level, method, n, seed)


def frechet_infinity(
    real_features: Any, fake_features: Any, points: int = 15, smallest: int | None = None, seed: int | None = 0
) -> float:
    """The bias-corrected Fréchet distance FD∞ of Chong & Forsyth (CVPR 2020, "Effectively Unbiased FID"): FD
    grows like a + b/n, so FD is computed on random subsets of `points` sizes from `smallest` (default n/5,
    never below 10) to n, a line is fit in 1/n, and its intercept (n → ∞) is FD∞. Comparable
    across numbers of images, where FD at n is not (the paper's 5,000-image FID sits below a 200-image one of
    the same model). Hand-written: their code fits Inception activations only, not arbitrary features."""
    reference = FrechetReference(real_features)
    fake = np.asarray(fake_features, dtype=np.float64)
    n = len(fake)
    low = max(10, smallest if smallest is not None else n // 5)
    if n < low + 2:
        return float("nan")
    sizes = np.unique(np.linspace(low, n, points).astype(int))
    rng = np.random.default_rng(_seed(seed))
    fds = [reference.distance(fake[rng.permutation(n)[:m]]) for m in sizes]
    slope, intercept = np.polyfit(1.0 / sizes, fds, 1)
    return float(intercept)


# --- classifier AUC --------------------------------------------------------------------------


def classifier_auc_cell(positives: int, negatives: int, auc: float, digits: int = 1) -> str:
    """What a table shows for a classifier AUC (%): the number, or "too few (n)" when fewer than
    MIN_POSITIVES positive images stand behind it (an AUC from 2 images swings by 50 points with one image);
    "no negatives" / "n/a" when it cannot be computed."""
    if positives < MIN_POSITIVES:
        return f"too few ({positives})"
    if negatives < 1:
        return "no negatives"
    return _number(auc, digits)
