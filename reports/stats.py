"""Uncertainty and significance for the report's cells: pure functions on numbers and per-image predictions.

Over seeds: Student-t intervals and Welch's t-test (the unit is the run), Holm over a column, ranks of
methods with a bootstrap over their seeds. Over test images: percentile bootstrap of accuracies and
clustering metrics (``ssl_common.clustering_metrics``). Values in percent; per-image arrays are [n] or
[seeds, n], and one resample of image indices serves every array, seed and method (all runs of a suite
share the test images). Randomness: ``numpy.random.default_rng(seed)``, so rebuilds are byte-identical.
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


class Delta(NamedTuple):
    delta: float  # ours - paper
    ci_low: float
    ci_high: float
    df: float
    p_value: float  # two-sided Welch p (NaN: the paper gives no std over n >= 2 runs)


class SeedTest(NamedTuple):
    diff: float  # mean(a) - mean(b)
    low: float  # Welch–Satterthwaite interval of the difference
    high: float
    p_value: float  # two-sided Welch p (NaN: not testable)


# ---------------------------------------------------------------------------------------------- over seeds


def _t(level: float, df: float) -> float:
    """The two-sided Student-t quantile at `level`."""
    return float(stats.t.ppf((1 + level) / 2, df))


def seed_summary(values, level: float = LEVEL) -> SeedSummary:
    """Mean, sample std (ddof=1) and the Student-t interval mean ± t_{n-1} · s/√n over seeds (NaN std and
    bounds for fewer than two seeds)."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    if n < 2:
        return SeedSummary(mean, math.nan, n, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = _t(level, n - 1) * std / math.sqrt(n)
    return SeedSummary(mean, std, n, mean - half, mean + half)


def delta_interval(ours, paper_mean, paper_std=None, paper_n=None, level: float = LEVEL) -> Delta:
    """Δ = mean(ours over seeds) − paper_mean with a t interval: Welch–Satterthwaite, and Welch's p
    (``scipy.stats.ttest_ind_from_stats``), when the paper gives its std over n >= 2 runs (both stds 0: no
    p), else the prediction interval of one new run of ours (Δ ± t_{n-1} · s · √(1 + 1/n)); NaN bounds with
    a single seed of ours."""
    own = seed_summary(ours, level)
    delta = own.mean - float(paper_mean)
    if own.n < 2:
        return Delta(delta, math.nan, math.nan, math.nan, math.nan)
    if not (paper_std is not None and paper_n is not None and math.isfinite(paper_std) and paper_n >= 2):
        # the paper's number is one run: where one new run of ours would fall
        half = _t(level, own.n - 1) * own.std * math.sqrt(1 + 1 / own.n)
        return Delta(delta, delta - half, delta + half, float(own.n - 1), math.nan)
    va, vb = own.std**2 / own.n, paper_std**2 / paper_n
    if va + vb == 0:
        return Delta(delta, delta, delta, math.nan, math.nan)
    # Welch–Satterthwaite degrees of freedom (scipy's *_from_stats give none)
    df = (va + vb) ** 2 / (va**2 / (own.n - 1) + vb**2 / (paper_n - 1))
    half = _t(level, df) * math.sqrt(va + vb)
    welch = stats.ttest_ind_from_stats(own.mean, own.std, own.n, paper_mean, paper_std, paper_n, equal_var=False)
    return Delta(delta, delta - half, delta + half, float(df), float(welch.pvalue))


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


def accuracy_interval(correct, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = SEED) -> Interval:
    """Accuracy in percent (mean over seeds; ``correct`` bool [n] or [seeds, n]) with its percentile bootstrap
    interval over test images, the same resampled images serving every seed."""
    c = np.asarray(correct)
    if c.ndim not in (1, 2):
        raise ValueError(f"correct must be [n] or [seeds, n], got shape {c.shape}")
    # per-image percent correct averaged over seeds: its mean over any resample = the mean of the seeds' accuracies
    score = 100.0 * np.atleast_2d(c).astype(np.float64).mean(axis=0)
    reps = np.concatenate([score[block].mean(axis=1) for block in _resamples(len(score), n_boot, seed)])
    return Interval(float(score.mean()), *_percentiles(reps, level))


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
    """A clustering metric (a name of ``ssl_common.clustering_metrics.SCALAR``) in percent, not clipped;
    ``labels_pred`` [n] or [seeds, n] (mean over seeds)."""
    score = cmetrics.SCALAR[metric]
    y = cmetrics.index_labels(labels_true).reshape(-1)
    preds = np.atleast_2d(cmetrics.index_labels(labels_pred))
    return 100.0 * float(np.mean([score(y, p) for p in preds]))


def clustering_replicates(labels_true, labels_pred, metric: str = "nmi", n_boot: int = N_BOOT, seed: int = SEED,
                          together: tuple[str, ...] = ()) -> np.ndarray:
    """Bootstrap replicates (percent) of a clustering metric over test images, mean over seeds, with the
    resamples of ``_resamples``: one bincount per block of resamples makes the contingency matrices. AMI
    uses the observed marginals' expected mutual information (exact per replicate costs minutes a report;
    tests/test_stats.py bounds the difference). The metrics `together` with it (the other metrics of the same
    predictions) are scored on the same matrices, their most costly part, and kept for their own calls."""
    y = cmetrics.index_labels(labels_true).reshape(-1)
    preds = np.atleast_2d(cmetrics.index_labels(labels_pred))
    key = (hashlib.sha256(y.tobytes() + b"|" + preds.tobytes() + repr(preds.shape).encode()).hexdigest(), n_boot, seed)
    if metric not in _REPLICATES.get(key, {}):
        if len(_REPLICATES) >= _REPLICATES_KEPT:
            _REPLICATES.clear()
        _REPLICATES[key] = {**_REPLICATES.get(key, {}),
                            **_clustering_replicates(y, preds, sorted({metric, *together}), n_boot, seed)}
    return _REPLICATES[key][metric].copy()


_REPLICATES: dict[tuple, dict[str, np.ndarray]] = {}
_REPLICATES_KEPT = 64  # a few metrics x n_boot floats each


def _clustering_replicates(y: np.ndarray, preds: np.ndarray, metrics: list[str], n_boot: int,
                           seed: int) -> dict[str, np.ndarray]:
    classes, k = int(y.max()) + 1, int(preds.max()) + 1
    emis = [cmetrics.expected_mutual_information(np.bincount(y), np.bincount(p)) if "ami" in metrics else None
            for p in preds]
    out: dict[str, list] = {metric: [] for metric in metrics}
    for block in _resamples(len(y), n_boot, seed):
        tables = (cmetrics.resampled_contingencies(y, p, block, classes, k) for p in preds)  # one at a time
        per_seed = [{m: cmetrics.batched_scores(c, m, emi) for m in metrics} for c, emi in zip(tables, emis)]
        for m in metrics:
            out[m].append(100.0 * np.mean([scores[m] for scores in per_seed], axis=0))
    return {m: np.concatenate(parts) for m, parts in out.items()}


def clustering_interval(labels_true, labels_pred, metric: str = "nmi", n_boot: int = N_BOOT,
                        level: float = LEVEL, seed: int = SEED, together: tuple[str, ...] = ()) -> Interval:
    """Percentile bootstrap interval (percent) of a clustering metric over test images (`together`: as in
    ``clustering_replicates``). Caveat: duplicated images inflate agreement (NMI, AMI, ACC), so the interval can
    lie above the observed value."""
    reps = clustering_replicates(labels_true, labels_pred, metric, n_boot, seed, together)
    return Interval(clustering_score(labels_true, labels_pred, metric), *_percentiles(reps, level))


# ------------------------------------------------------------------- between cells (the unit: the run), ranks


def welch_seed_test(values_a, values_b, level: float = LEVEL) -> SeedTest:
    """Welch's t-test on two cells' per-seed values (``scipy.stats.ttest_ind(equal_var=False)``) with the
    interval of the difference; not testable (NaN) with fewer than two seeds a side or no variation at all."""
    a = np.asarray(values_a, dtype=np.float64)
    b = np.asarray(values_b, dtype=np.float64)
    diff = float(a.mean() - b.mean()) if a.size and b.size else math.nan
    if a.size < 2 or b.size < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
        return SeedTest(diff, math.nan, math.nan, math.nan)
    res = stats.ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(confidence_level=level)
    return SeedTest(diff, float(ci.low), float(ci.high), float(res.pvalue))


RANK_INTERVAL_COLUMNS = ("method", "mean_rank", "rank_low", "rank_high", "n_seeds")


def rank_of_means(scores: pd.DataFrame, n_boot: int = N_BOOT, level: float = LEVEL,
                  seed: int = SEED) -> pd.DataFrame:
    """Average rank (``scipy.stats.rankdata``, 1 = best, ties averaged) of each method's seed mean over the
    metrics of ``scores`` (method, seed, metric, value; higher is better), with a percentile interval from
    resampling each method's seeds independently per metric; ``n_seeds`` = the method's fewest seeds."""
    frame = scores[["method", "seed", "metric", "value"]].dropna()
    methods = sorted(set(frame["method"]))
    metrics = sorted(set(frame["metric"]))
    if not methods or not metrics:
        return pd.DataFrame(columns=list(RANK_INTERVAL_COLUMNS))
    groups = {(m, k): g["value"].to_numpy(np.float64) for (m, k), g in frame.groupby(["method", "metric"])}
    means = np.array([[groups[(m, k)].mean() for m in methods] for k in metrics])  # [metric, method]
    rng = np.random.default_rng(seed)
    reps = np.array([[v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
                      for v in (groups[(m, k)] for m in methods)] for k in metrics])  # [metric, method, n_boot]
    boot = stats.rankdata(-reps, axis=1).mean(axis=0)  # [method, n_boot]
    low, high = np.percentile(boot, [50 * (1 - level), 50 * (1 + level)], axis=1)
    return pd.DataFrame({"method": methods, "mean_rank": stats.rankdata(-means, axis=1).mean(axis=0),
                         "rank_low": low, "rank_high": high,
                         "n_seeds": [min(len(groups[(m, k)]) for k in metrics) for m in methods]},
                        ).sort_values(["mean_rank", "method"], kind="stable").reset_index(drop=True)
