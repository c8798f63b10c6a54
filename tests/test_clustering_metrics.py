"""ssl_common.clustering_metrics: the scalar forms against scikit-learn and hand cases, the expected mutual
information against scikit-learn's AMI, and the batched forms against the scalar ones on every resample."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import entropy
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix, mutual_info_score

from ssl_common import clustering_metrics as cm

CASES = [(5, 5, 400, 0), (7, 12, 500, 1), (6, 3, 300, 2), (10, 10, 1000, 3), (3, 30, 200, 4)]


def _labelings(classes, clusters, n, seed, follow=0.5):
    """Random classes, and clusters that follow them on about `follow` of the items (scores far from 0)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    return y, np.where(rng.random(n) < follow, y % clusters, rng.integers(0, clusters, n))


@pytest.mark.parametrize("classes,clusters,n,seed", CASES)
def test_scalar_forms_are_scikit_learns(classes, clusters, n, seed):
    y, p = _labelings(classes, clusters, n, seed)
    assert cm.nmi(y, p) == normalized_mutual_info_score(y, p)
    assert cm.ami(y, p) == adjusted_mutual_info_score(y, p)
    assert cm.ari(y, p) == adjusted_rand_score(y, p)
    assert cm.clustering_metrics(y, p) == {"nmi": cm.nmi(y, p), "ami": cm.ami(y, p), "ari": cm.ari(y, p),
                                           "acc": cm.acc_one_to_one(y, p)}


def _ami_from(y, p, emi):
    """scikit-learn's AMI with our expected mutual information in place of its own."""
    mi, mean_h = mutual_info_score(y, p), (entropy(np.bincount(y)) + entropy(np.bincount(p))) / 2
    return (mi - emi) / (mean_h - emi)


@pytest.mark.parametrize("seed", range(8))
def test_expected_mutual_information_gives_scikit_learns_ami(seed):
    rng = np.random.default_rng(100 + seed)
    classes, clusters, n = rng.integers(2, 15), rng.integers(2, 40), rng.integers(20, 800)
    y, p = _labelings(classes, clusters, n, seed, follow=rng.random())
    emi = cm.expected_mutual_information(np.bincount(y), np.bincount(p))
    assert _ami_from(y, p, emi) == pytest.approx(adjusted_mutual_info_score(y, p), abs=1e-10)


def test_expected_mutual_information_hand_cases():
    # two items, two singletons each side: every permutation gives MI = log 2
    assert cm.expected_mutual_information([1, 1], [1, 1]) == pytest.approx(np.log(2), abs=1e-15)
    # sizes (2, 1) vs (2, 1) over 3 items: the mean MI over the 3 distinct placements of the singleton
    perms = [np.array(q) for q in ([0, 0, 1], [0, 1, 0], [1, 0, 0])]
    by_hand = np.mean([mutual_info_score([0, 0, 1], q) for q in perms])
    assert cm.expected_mutual_information([2, 1], [2, 1]) == pytest.approx(by_hand, abs=1e-15)
    # one cluster on a side, or empty clusters: zero entropy / ignored
    assert cm.expected_mutual_information([5], [2, 3]) == 0.0
    without_empty = cm.expected_mutual_information([2, 1], [2, 1])
    assert cm.expected_mutual_information([0, 2, 0, 1], [2, 0, 1]) == without_empty
    with pytest.raises(ValueError, match="disagree"):
        cm.expected_mutual_information([2, 2], [1, 1])


def test_accuracies_hand_cases():
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    p = np.array([1, 1, 0, 0, 0, 0, 2, 2])  # best matching 0->1, 1->0, 2->2: 2 + 2 + 2 of 8
    assert cm.acc_one_to_one(y, p) == 0.75
    assert cm.acc_many_to_one(y, p) == 0.75  # column maxima 2, 2, 2
    y = np.repeat(np.arange(10), 30)
    p = 3 * y + np.arange(300) % 3  # 30 pure clusters, 3 per class
    assert cm.acc_many_to_one(y, p) == 1.0
    assert cm.acc_one_to_one(y, p) == pytest.approx(1 / 3)  # unmatched clusters count wrong


def test_labels_are_checked_and_labelled_nmi_skips_unlabelled_items():
    with pytest.raises(ValueError, match="integers"):
        cm.nmi(np.zeros(3), np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="3 entries but labels_pred has 2"):
        cm.ari([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="no labels"):
        cm.acc_one_to_one(np.array([], dtype=int), np.array([], dtype=int))
    with pytest.raises(ValueError, match="non-negative"):
        cm.index_labels([0, -1])
    y, p = _labelings(4, 4, 100, 9)
    hidden = y.copy()
    hidden[::3] = -1
    keep = hidden >= 0
    assert cm.labelled_nmi(hidden, p) == normalized_mutual_info_score(y[keep], p[keep])


# ------------------------------------------------------------------------------------------------ batched


@pytest.mark.parametrize("classes,clusters,n,seed", CASES)
@pytest.mark.parametrize("metric", sorted(cm.SCALAR))
def test_batched_forms_equal_the_scalar_ones_on_each_resample(metric, classes, clusters, n, seed):
    y, p = _labelings(classes, clusters, n, seed)
    resamples = np.random.default_rng(seed).integers(0, n, size=(6, n))
    # two more classes and three more clusters than used: empty rows and columns too
    tables = cm.resampled_contingencies(y, p, resamples, classes + 2, clusters + 3)
    assert tables.shape == (6, classes + 2, clusters + 3)
    batched = cm.batched_scores(tables, metric)  # AMI: each table's own expected mutual information
    scalar = [cm.SCALAR[metric](y[r], p[r]) for r in resamples]
    assert batched == pytest.approx(scalar, abs=1e-10)
    drawn = tables[0][tables[0].sum(axis=1) > 0][:, tables[0].sum(axis=0) > 0]  # scikit-learn's relabelling
    assert np.array_equal(drawn, contingency_matrix(y[resamples[0]], p[resamples[0]]))


def test_batched_ami_with_a_shared_expected_mutual_information():
    y, p = _labelings(6, 8, 400, 5)
    tables = cm.resampled_contingencies(y, p, np.arange(400)[None], 6, 8)  # the observed table itself
    emi = cm.expected_mutual_information(np.bincount(y), np.bincount(p))
    exact = adjusted_mutual_info_score(y, p)
    assert cm.batched_scores(tables, "ami", emi) == pytest.approx([exact], abs=1e-10)


def test_batched_degenerate_tables_follow_scikit_learn():
    y = np.arange(12) % 3
    one = np.zeros(12, dtype=np.int64)
    for true, pred in [(y, one), (one, y), (one, one), (y, y), (y, np.arange(12))]:
        tables = cm.resampled_contingencies(true, pred, np.arange(12)[None], true.max() + 1, pred.max() + 1)
        for metric, score in cm.SCALAR.items():
            assert cm.batched_scores(tables, metric)[0] == pytest.approx(score(true, pred), abs=1e-10), metric
    with pytest.raises(ValueError, match="unknown clustering metric"):
        cm.batched_scores(tables, "purity")
