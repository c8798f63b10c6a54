"""Uncertainty and significance for the report's cells: pure functions on numbers and per-image predictions.

* Over seeds: ``seed_summary`` (mean, sample std, Student-t interval), ``welch_test`` and
  ``delta_interval`` (ours vs a paper's mean ± std over its runs).
* Over test images within runs: percentile bootstrap (``accuracy_interval``, ``clustering_interval``).
* Clustering metrics (NMI, AMI, ARI, one-to-one and many-to-one ACC; ``ssl_common.clustering_metrics``) in
  percent, averaged over seeds, and their bootstrap replicates (``clustering_replicates``).
* Between cells, the unit being the run: ``welch_seed_test`` and ``holm``; ``rank_of_means`` of methods over
  metrics with a bootstrap over each method's seeds.

Conventions: accuracies and metrics in percent (0-100); arrays of per-image values have the images on
the last axis, with an optional leading seed axis ([seeds, n]); every run of a suite is scored on the
same test images in the same order, so one resample of image indices is applied to every array, seed
and method at once. All randomness comes from ``numpy.random.default_rng(seed)`` with a fixed default
seed, so a rebuild gives byte-identical numbers.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

from ssl_common import clustering_metrics as cmetrics

LEVEL = 0.95
N_BOOT = 1000
SEED = 0
_BLOCK = 4_000_000  # resampled indices drawn at once (32 MB), whatever n_boot is


class SeedSummary(NamedTuple):
    mean: float
    std: float
    n: int
    ci_low: float
    ci_high: float


class Interval(NamedTuple):
    value: float  # the statistic on the data as observed
    ci_low: float
    ci_high: float


class WelchTest(NamedTuple):
    t: float
    df: float
    p_value: float


class Delta(NamedTuple):
    delta: float  # ours - paper
    ci_low: float
    ci_high: float
    df: float


# ---------------------------------------------------------------------------------------------- over seeds


def seed_summary(values, level: float = LEVEL) -> SeedSummary:
    """Mean, sample std (ddof=1) and the Student-t interval for the mean over seeds.

    The t interval (mean ± t_{(1+level)/2, n-1} · s/√n) is exact for normal seed-to-seed noise and the
    usual choice for the 3-5 seeds of a benchmark; std and bounds are NaN for fewer than two seeds.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    if n < 2:
        return SeedSummary(mean, math.nan, n, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * std / math.sqrt(n)
    return SeedSummary(mean, std, n, mean - half, mean + half)


def _missing(std, n) -> bool:
    return std is None or n is None or not math.isfinite(std) or not math.isfinite(n) or n < 2


def welch_test(mean_a, std_a, n_a, mean_b, std_b, n_b) -> WelchTest:
    """Welch's unequal-variance t-test from two means, sample stds and counts (e.g. ours vs a paper's).

    Neither the variances nor the counts need agree between the two sides, hence Welch rather than
    Student (``scipy.stats.ttest_ind_from_stats(equal_var=False)``). Two-sided p. NaN throughout when a
    std is missing or a side has fewer than two runs (or both stds are 0).
    """
    if _missing(std_a, n_a) or _missing(std_b, n_b) or std_a == std_b == 0:
        return WelchTest(math.nan, math.nan, math.nan)
    va, vb = std_a**2 / n_a, std_b**2 / n_b
    df = (va + vb) ** 2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1))  # Welch–Satterthwaite; scipy gives no df
    t, p = stats.ttest_ind_from_stats(mean_a, std_a, n_a, mean_b, std_b, n_b, equal_var=False)
    return WelchTest(float(t), float(df), float(p))


def delta_interval(ours, paper_mean, paper_std=None, paper_n=None, level: float = LEVEL) -> Delta:
    """Δ = mean(ours over seeds) − paper_mean, with a t interval for the difference.

    * paper std and n (n >= 2) given, and >= 2 seeds of ours: Welch–Satterthwaite interval
      Δ ± t_{df} · √(s²/n + s_p²/n_p), consistent with ``welch_test``;
    * no usable paper std or n (a single reported number: one run, not an exact value): the prediction
      interval of one new run of ours, Δ ± t_{n-1} · s · √(1 + 1/n);
    * a single seed of ours: NaN bounds (our run-to-run spread is unknown, whatever the paper reports).
    """
    own = seed_summary(ours, level)
    delta = own.mean - float(paper_mean)
    if own.n < 2:
        return Delta(delta, math.nan, math.nan, math.nan)
    if _missing(paper_std, paper_n):  # the paper's number is one run: where one new run of ours would fall
        half = float(stats.t.ppf((1 + level) / 2, own.n - 1)) * own.std * math.sqrt(1 + 1 / own.n)
        return Delta(delta, delta - half, delta + half, float(own.n - 1))
    va, vb = own.std**2 / own.n, paper_std**2 / paper_n
    if va + vb == 0:
        return Delta(delta, delta, delta, math.nan)
    df = (va + vb) ** 2 / (va**2 / (own.n - 1) + vb**2 / (paper_n - 1))  # Welch–Satterthwaite, by hand
    half = float(stats.t.ppf((1 + level) / 2, df)) * math.sqrt(va + vb)
    return Delta(delta, delta - half, delta + half, float(df))


# ------------------------------------------------------------------------------------ over test images


def _resamples(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Bootstrap index vectors (n draws with replacement), as blocks of rows [b, n] from one generator."""
    if n < 1:
        raise ValueError("no test images to resample")
    rng = np.random.default_rng(seed)
    rows = max(1, min(n_boot, _BLOCK // n))
    for start in range(0, n_boot, rows):
        yield rng.integers(0, n, size=(min(rows, n_boot - start), n))


def _percentiles(reps: np.ndarray, level: float) -> tuple[float, float]:
    low, high = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _boot_means(score: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap replicates of score.mean() (score: [n]), vectorised over a block of resamples."""
    return np.concatenate([score[block].mean(axis=1) for block in _resamples(len(score), n_boot, seed)])


def _per_image_accuracy(correct) -> np.ndarray:
    """[n] per-image percent correct averaged over seeds: its mean over images = mean over seeds of the
    per-seed accuracies, also for every resample shared by the seeds."""
    c = np.asarray(correct)
    if c.ndim not in (1, 2):
        raise ValueError(f"correct must be [n] or [seeds, n], got shape {c.shape}")
    return 100.0 * np.atleast_2d(c).astype(np.float64).mean(axis=0)


def accuracy_interval(correct, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = SEED) -> Interval:
    """Accuracy in percent (mean over seeds of each seed's accuracy) with its percentile bootstrap interval.

    ``correct`` is bool [n] or [seeds, n]; the same resampled images serve every seed (the test images are
    shared), so the interval reflects the test-set sampling only. Vectorised; same resamples as
    the generic bootstrap (a statistic on every resample; tests/test_stats.py) with the same seed.
    """
    score = _per_image_accuracy(correct)
    return Interval(float(score.mean()), *_percentiles(_boot_means(score, n_boot, seed), level))


def holm(p_values) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (family-wise error control without independence assumptions)."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    # Step-down by hand (scipy has no Holm): p_(i) · (m − i), made monotone, capped at 1.
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (len(p) - np.arange(len(p)))))
    out = np.empty_like(p)
    out[order] = adjusted
    return out


# ------------------------------------------------------------------------------- clustering metrics
# The metrics themselves are ssl_common.clustering_metrics' (scalar: scikit-learn; batched: by hand);
# here they get seeds, bootstrap replicates and intervals.


def clustering_score(labels_true, labels_pred, metric: str = "nmi") -> float:
    """A clustering metric in percent (not clipped: AMI/ARI may be < 0); ``labels_pred`` [n] or [seeds, n]
    (mean over seeds). ``metric``: a name of ``ssl_common.clustering_metrics.SCALAR``."""
    score = cmetrics.SCALAR[metric]
    y = cmetrics.index_labels(labels_true).reshape(-1)
    preds = np.atleast_2d(cmetrics.index_labels(labels_pred))
    return 100.0 * float(np.mean([score(y, p) for p in preds]))


def clustering_replicates(labels_true, labels_pred, metric: str = "nmi", n_boot: int = N_BOOT,
                          seed: int = SEED) -> np.ndarray:
    """Bootstrap replicates (percent) of a clustering metric over test images: the same resamples as
    the generic bootstrap (a statistic on every resample; tests/test_stats.py) with the same seed, each
    replicate's contingency matrices made in one bincount for a block of resamples and the metric vectorised
    over the block; `labels_pred` [n] or [seeds, n] (the mean over seeds, as ``clustering_score``).

    AMI: each replicate uses the expected mutual information of the observed marginals (hand-made choice:
    an exact EMI costs ~0.2 ms a replicate, minutes for a report; resampling moves the marginals little, and
    tests/test_stats.py bounds the difference to the exact per-replicate AMI)."""
    y = cmetrics.index_labels(labels_true).reshape(-1)
    preds = np.atleast_2d(cmetrics.index_labels(labels_pred))
    # a report asks for the same replicates many times (a column's best row: its interval, then one paired
    # test per contender); they are a pure function of these inputs, so they are computed once
    key = (hashlib.sha256(y.tobytes() + b"|" + preds.tobytes() + repr(preds.shape).encode()).hexdigest(),
           metric, n_boot, seed)
    if key not in _REPLICATES:
        if len(_REPLICATES) >= _REPLICATES_KEPT:
            _REPLICATES.clear()
        _REPLICATES[key] = _clustering_replicates(y, preds, metric, n_boot, seed)
    return _REPLICATES[key].copy()


_REPLICATES: dict[tuple, np.ndarray] = {}
_REPLICATES_KEPT = 512  # n_boot floats each: a few MB at most


def _clustering_replicates(y: np.ndarray, preds: np.ndarray, metric: str, n_boot: int, seed: int) -> np.ndarray:
    classes, k = int(y.max()) + 1, int(preds.max()) + 1
    emis = [cmetrics.expected_mutual_information(np.bincount(y), np.bincount(p)) if metric == "ami" else None
            for p in preds]
    out = []
    for block in _resamples(len(y), n_boot, seed):
        tables = (cmetrics.resampled_contingencies(y, p, block, classes, k) for p in preds)  # one at a time
        per_seed = [cmetrics.batched_scores(c, metric, emi) for c, emi in zip(tables, emis)]
        out.append(100.0 * np.mean(per_seed, axis=0))
    return np.concatenate(out)


def clustering_interval(labels_true, labels_pred, metric: str = "nmi", n_boot: int = N_BOOT,
                        level: float = LEVEL, seed: int = SEED) -> Interval:
    """Percentile bootstrap interval (percent) of a clustering metric over test images.

    Resampling images with replacement only reweights the contingency matrix (multinomial weights), so
    each replicate is one bincount of the resampled (class, cluster) pairs plus the metric on a small
    matrix; the same resamples as the generic bootstrap (a statistic on every resample; tests/test_stats.py)
    with scikit-learn on the resampled labels.
    Caveat: duplicated images inflate agreement (NMI, AMI, ACC); with ~100 images per class and K = 100
    the whole interval can lie above the observed value. AMI's replicates share the observed marginals'
    expected mutual information (``clustering_replicates``).
    """
    reps = clustering_replicates(labels_true, labels_pred, metric, n_boot, seed)
    return Interval(clustering_score(labels_true, labels_pred, metric), *_percentiles(reps, level))


# ------------------------------------------------------------------- between cells (the unit: the run), ranks


class SeedTest(NamedTuple):
    diff: float  # mean(a) - mean(b)
    low: float  # interval of the difference at ``level`` (Welch–Satterthwaite)
    high: float
    df: float
    p_value: float  # two-sided Welch p (NaN: not testable)


def welch_seed_test(values_a, values_b, level: float = LEVEL) -> SeedTest:
    """Welch's t-test whose unit is the run: the two cells' per-seed values
    (``scipy.stats.ttest_ind(equal_var=False)``), with the matching interval of the difference of means.

    Not testable (NaN p and bounds) when a side has fewer than two seeds or neither side varies over its
    seeds (the variance the test needs is then unknown, not zero)."""
    a = np.asarray(values_a, dtype=np.float64)
    b = np.asarray(values_b, dtype=np.float64)
    diff = float(a.mean() - b.mean()) if a.size and b.size else math.nan
    if a.size < 2 or b.size < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
        return SeedTest(diff, math.nan, math.nan, math.nan, math.nan)
    res = stats.ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(confidence_level=level)
    return SeedTest(diff, float(ci.low), float(ci.high), float(res.df), float(res.pvalue))


RANK_INTERVAL_COLUMNS = ("method", "mean_rank", "rank_low", "rank_high", "n_seeds")


def rank_of_means(scores: pd.DataFrame, n_boot: int = N_BOOT, level: float = LEVEL,
                  seed: int = SEED) -> pd.DataFrame:
    """Average rank of each method's seed mean over the metrics, with a bootstrap rank interval.

    ``scores`` has rows (method, seed, metric, value); higher is better. Per metric the methods' means
    over their own seeds are ranked (``scipy.stats.rankdata``, ties share the average rank, rank 1 =
    best) and the ranks averaged over the metrics. The interval: each replicate resamples every method's
    seeds independently (with replacement, per metric, as many as it has; no pairing of seed s of one
    method with seed s of another), recomputes the average rank; percentile bounds at ``level``. A method
    with one seed keeps its value in every replicate (its interval reflects the others' spread only).
    Sorted by mean rank, then name; ``n_seeds`` = the fewest seeds of the method over the metrics.
    """
    frame = scores[["method", "seed", "metric", "value"]].dropna()
    methods = sorted(set(frame["method"]))
    metrics = sorted(set(frame["metric"]))
    if not methods or not metrics:
        return pd.DataFrame(columns=list(RANK_INTERVAL_COLUMNS))
    groups = {(m, k): g["value"].to_numpy(np.float64) for (m, k), g in frame.groupby(["method", "metric"])}
    means = np.array([[groups[(m, k)].mean() for m in methods] for k in metrics])  # [metric, method]
    point = stats.rankdata(-means, axis=1).mean(axis=0)
    rng = np.random.default_rng(seed)
    reps = np.empty((n_boot, len(metrics), len(methods)))
    for i, k in enumerate(metrics):
        for j, m in enumerate(methods):
            v = groups[(m, k)]
            reps[:, i, j] = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    boot = stats.rankdata(-reps, axis=2).mean(axis=1)  # [n_boot, method]
    low, high = np.percentile(boot, [50 * (1 - level), 50 * (1 + level)], axis=0)
    n_seeds = [min(len(groups[(m, k)]) for k in metrics) for m in methods]
    out = pd.DataFrame({"method": methods, "mean_rank": point, "rank_low": low, "rank_high": high,
                        "n_seeds": n_seeds})
    return out.sort_values(["mean_rank", "method"], kind="stable").reset_index(drop=True)
