"""reports.stats against closed forms, hand tables and scikit-learn / scipy (all fast, CPU only)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, normalized_mutual_info_score

from reports import stats
from ssl_common.clustering_metrics import acc_many_to_one

T_975_DF2 = 4.302652729911275  # t_{0.975, 2}, from tables


def _planted(n=2000, acc=0.8, extra=60, seed=1):
    """A correct on `acc` of n images; B = A plus `extra` more correct images."""
    rng = np.random.default_rng(seed)
    a = np.zeros(n, dtype=bool)
    a[rng.permutation(n)[: int(acc * n)]] = True
    b = a.copy()
    b[rng.permutation(np.flatnonzero(~a))[:extra]] = True
    return a, b


# ------------------------------------------------------------------------------------------- over seeds


def generic_replicates(statistic, arrays, n_boot, seed) -> np.ndarray:
    """Reference bootstrap: `statistic` on every resample of the images (the last axis of every array), the
    resamples of reports.stats (one generator, the same draws)."""
    arrays = [np.asarray(a) for a in arrays]
    return np.asarray([statistic(*(a[..., i] for a in arrays))
                       for block in stats._resamples(np.shape(arrays[0])[-1], n_boot, seed) for i in block])


def generic_interval(statistic, arrays, n_boot, seed) -> stats.Interval:
    reps = generic_replicates(statistic, arrays, n_boot, seed)
    low, high = np.quantile(reps, [0.025, 0.975])
    return stats.Interval(float(statistic(*[np.asarray(a) for a in arrays])), float(low), float(high))


def test_seed_summary_closed_form():
    s = stats.seed_summary([1.0, 2.0, 4.0])
    mean, sd = 7 / 3, math.sqrt(7 / 3)  # sum of squared deviations 42/9, over n - 1 = 2
    half = T_975_DF2 * sd / math.sqrt(3)
    assert (s.n, s.mean, s.std) == (3, pytest.approx(mean, abs=1e-12), pytest.approx(sd, abs=1e-12))
    assert s.ci_low == pytest.approx(mean - half, abs=1e-9)
    assert s.ci_high == pytest.approx(mean + half, abs=1e-9)


def test_seed_summary_one_seed_has_nan_spread():
    s = stats.seed_summary([71.5])
    assert s.mean == 71.5 and s.n == 1 and all(math.isnan(x) for x in (s.std, s.ci_low, s.ci_high))


def test_delta_interval_welch_p_hand_computation():
    ma, sa, na, mb, sb, nb = 71.2, 0.4, 3, 70.1, 0.9, 5
    va, vb = sa**2 / na, sb**2 / nb
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    res = stats.delta_interval([70.8, 71.2, 71.6], mb, sb, nb)  # mean 71.2, sample std 0.4
    assert res.delta == pytest.approx(ma - mb, rel=1e-12) and res.df == pytest.approx(df, rel=1e-9)
    assert (t, df) == (pytest.approx(2.37048, abs=1e-5), pytest.approx(5.80824, abs=1e-5))  # by hand
    assert res.p_value == pytest.approx(2 * sps.t.sf(abs(t), df), rel=1e-9)


@pytest.mark.parametrize("args", [([70.8, 71.2, 71.6], 70.1, None, 5), ([71.2], 70.1, 0.9, 5),
                                  ([70.8, 71.2, 71.6], 70.1, math.nan, 5), ([70.8, 71.2, 71.6], 70.1, 0.9, 1),
                                  ([71.0, 71.0, 71.0], 70.1, 0.0, 5)])
def test_delta_interval_has_no_welch_p_without_std_runs_or_spread(args):
    assert math.isnan(stats.delta_interval(*args).p_value)


def test_delta_interval_welch_and_constant_paper():
    ours, paper, paper_std, paper_n = [70.0, 71.0, 72.5], 70.5, 0.8, 5
    m, s = np.mean(ours), np.std(ours, ddof=1)
    va, vb = s**2 / 3, paper_std**2 / paper_n
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / (paper_n - 1))
    half = sps.t.ppf(0.975, df) * math.sqrt(va + vb)
    d = stats.delta_interval(ours, paper, paper_std, paper_n)
    assert d.delta == pytest.approx(m - paper, abs=1e-12) and d.df == pytest.approx(df, rel=1e-12)
    assert d.ci_low == pytest.approx(m - paper - half, abs=1e-9)
    assert d.ci_high == pytest.approx(m - paper + half, abs=1e-9)
    # paper number without std: one run, so the prediction interval of one new run of ours (t_{0.975, 2})
    c = stats.delta_interval(ours, paper)
    half = T_975_DF2 * s * math.sqrt(1 + 1 / 3)
    assert c.ci_low == pytest.approx(m - paper - half, abs=1e-9)
    assert c.ci_high == pytest.approx(m - paper + half, abs=1e-9)
    assert c.df == 2


def test_delta_interval_one_seed_has_nan_bounds():
    for d in (stats.delta_interval([71.0], 70.5), stats.delta_interval([71.0], 70.5, 0.8, 5)):
        assert d.delta == pytest.approx(0.5) and math.isnan(d.ci_low) and math.isnan(d.ci_high)


# ------------------------------------------------------------------------------------ over test images


def test_accuracy_interval_matches_binomial_interval():
    correct = np.zeros(10_000, dtype=bool)
    correct[np.random.default_rng(0).permutation(10_000)[:9_000]] = True
    res = stats.accuracy_interval(correct, n_boot=1000, seed=0)
    exact = sps.binomtest(9_000, 10_000).proportion_ci(0.95, method="exact")
    assert res.value == pytest.approx(90.0)
    assert abs(res.ci_low - 100 * exact.low) < 0.5 and abs(res.ci_high - 100 * exact.high) < 0.5
    assert res.ci_low < 90.0 < res.ci_high and res.ci_high - res.ci_low > 0.8  # ±0.59 points expected


def test_accuracy_interval_shares_images_across_seeds():
    a, _ = _planted(n=500)
    one = stats.accuracy_interval(a, n_boot=200, seed=3)
    three = stats.accuracy_interval(np.stack([a, a, a]), n_boot=200, seed=3)
    assert three == pytest.approx(one, abs=1e-9)  # independent resampling per seed would narrow it
    rows = np.stack([a, np.roll(a, 7)])
    generic = generic_interval(lambda c: 100 * c.mean(axis=-1).mean(), (rows,), n_boot=200, seed=3)
    assert stats.accuracy_interval(rows, n_boot=200, seed=3) == pytest.approx(generic, abs=1e-9)


def test_bootstrap_is_deterministic():
    a, b = _planted(n=800)
    assert stats.accuracy_interval(a, n_boot=300, seed=5) == stats.accuracy_interval(a, n_boot=300, seed=5)
    y = np.arange(800) % 4
    p = b.astype(np.int64) + 2 * (y % 2)
    first = stats.clustering_interval(y, p, "ami", 50, seed=5)
    assert first == stats.clustering_interval(y, p, "ami", 50, seed=5)
    assert stats.accuracy_interval(a, n_boot=300, seed=6) != stats.accuracy_interval(a, n_boot=300, seed=5)


def test_holm_adjustment_hand_numbers():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


# --------------------------------------------------------------------------------- clustering metrics


# the metrics themselves: tests/test_clustering_metrics.py; here their percent form over seeds and resamples


def test_clustering_score_is_scikit_learns_in_percent_with_unused_cluster_indices():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 4, 300)
    p = np.where(rng.random(300) < 0.5, y, rng.choice([0, 1, 2, 4, 5], 300))  # cluster 3 never used
    for metric, theirs in [("nmi", normalized_mutual_info_score), ("ami", adjusted_mutual_info_score),
                           ("ari", adjusted_rand_score)]:
        assert stats.clustering_score(y, p, metric) == pytest.approx(100 * theirs(y, p), abs=1e-10)
    with pytest.raises(ValueError, match="non-negative"):
        stats.clustering_score(y, p - 1, "nmi")


def test_over_clustering_accuracies():
    y = np.repeat(np.arange(10), 30)
    p = 3 * y + np.arange(300) % 3  # 30 pure clusters, 3 per class
    assert stats.clustering_score(y, p, "acc_many_to_one") == pytest.approx(100.0)
    assert stats.clustering_score(y, p, "acc") == pytest.approx(100 / 3)


def test_hungarian_accuracy_hand_case():
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    p = np.array([1, 1, 0, 0, 0, 0, 2, 2])  # best matching 0->1, 1->0, 2->2: 2 + 2 + 2 of 8
    assert stats.clustering_score(y, p, "acc") == pytest.approx(75.0)
    assert stats.clustering_score(y, p, "acc_many_to_one") == pytest.approx(75.0)  # column maxima 2, 2, 2


@pytest.mark.parametrize("metric,score,tolerance", [
    ("nmi", normalized_mutual_info_score, 1e-8), ("ari", adjusted_rand_score, 1e-8),
    ("acc_many_to_one", acc_many_to_one, 1e-8),
    # AMI's replicates use the observed marginals' expected MI: within 0.2 points of the exact replicates
    ("ami", adjusted_mutual_info_score, 0.2)])
def test_clustering_interval_equals_sklearn_on_resampled_labels(metric, score, tolerance):
    rng = np.random.default_rng(7)
    y = rng.integers(0, 6, 400)
    p = np.where(rng.random(400) < 0.6, y, rng.integers(0, 8, 400))
    ours = stats.clustering_interval(y, p, metric, n_boot=40, seed=11)
    theirs = generic_interval(lambda t, q: 100 * score(t, q), (y, p), n_boot=40, seed=11)
    assert ours == pytest.approx(theirs, abs=tolerance)
    assert ours.ci_low < ours.value < ours.ci_high
    reps = stats.clustering_replicates(y, p, metric, n_boot=40, seed=11)
    exact = generic_replicates(lambda t, q: 100 * score(t, q), [y, p], 40, 11)
    assert np.abs(reps - exact).max() <= tolerance


def test_clustering_score_averages_seeds():
    y = np.arange(200) % 4
    p = np.stack([y, (y + np.arange(200) % 2) % 4])
    expected = 50 * (1 + normalized_mutual_info_score(y, p[1]))
    assert stats.clustering_score(y, p, "nmi") == pytest.approx(expected, abs=1e-10)


# ------------------------------------------------------------------------------------------------ ranks


def test_clustering_replicates_are_fixed_by_their_inputs_and_seed():
    rng = np.random.default_rng(5)
    y, p = rng.integers(0, 4, 300), rng.integers(0, 6, 300)
    first = stats.clustering_replicates(y, p, "nmi", n_boot=50, seed=2)
    first[:] = -1.0  # a caller's change must not reach the next caller
    again = stats.clustering_replicates(y, p, "nmi", n_boot=50, seed=2)
    assert (again >= 0).all() and np.array_equal(again, stats.clustering_replicates(y, p, "nmi", n_boot=50, seed=2))
    assert not np.array_equal(again, stats.clustering_replicates(y, p, "nmi", n_boot=50, seed=3))


def test_clustering_replicates_scored_together_equal_each_scored_alone():
    rng = np.random.default_rng(3)
    y, p = rng.integers(0, 5, 300), rng.integers(0, 7, (2, 300))
    metrics = ("nmi", "ami", "ari", "acc", "acc_many_to_one")
    stats._REPLICATES.clear()
    together = {m: stats.clustering_replicates(y, p, m, n_boot=60, seed=4, together=metrics) for m in metrics}
    for metric in metrics:
        stats._REPLICATES.clear()  # computed again, alone
        assert np.array_equal(together[metric], stats.clustering_replicates(y, p, metric, n_boot=60, seed=4))


def test_rank_of_means_ranks_means_and_resamples_each_methods_seeds_independently():
    rows = [("A", s, m, v) for m in ("x", "y") for s, v in enumerate((90.0, 91.0, 92.0))]
    rows += [("B", s, m, v) for m in ("x", "y") for s, v in enumerate((80.0, 81.0, 82.0))]
    rows += [("C", s, "x", v) for s, v in enumerate((88.0, 89.0, 75.0))]  # overlaps B on x, never A
    rows += [("C", s, "y", v) for s, v in enumerate((70.0, 71.0, 72.0))]
    out = stats.rank_of_means(pd.DataFrame(rows, columns=["method", "seed", "metric", "value"]), n_boot=500)
    out = out.set_index("method")
    # x: means A 91, B 81, C 84 -> ranks 1, 3, 2; y: A 91, B 81, C 71 -> 1, 2, 3
    assert out["mean_rank"].to_dict() == pytest.approx({"A": 1.0, "B": 2.5, "C": 2.5})
    assert out.loc["A", "rank_low"] == out.loc["A", "rank_high"] == 1.0  # no resample overtakes A
    # C's seeds resampled to mostly 75 put it below B on x (P = 7/27 per replicate): both orders occur
    assert (out.loc["C", "rank_low"], out.loc["C", "rank_high"]) == (2.5, 3.0)
    assert (out.loc["B", "rank_low"], out.loc["B", "rank_high"]) == (2.0, 2.5)
    assert (out["n_seeds"] == 3).all()
    again = stats.rank_of_means(pd.DataFrame(rows, columns=["method", "seed", "metric", "value"]), n_boot=500)
    pd.testing.assert_frame_equal(again.set_index("method"), out)  # fixed seed: the same numbers
