"""The clustering metrics, in one place: NMI, AMI, ARI, one-to-one ACC (Hungarian) and many-to-one ACC.

Used by the evaluation (`benchmarks.evaluation.clustering`), the report's statistics (`reports.stats`) and
the methods' pseudo-label logs (`methods.sslpp`, `methods.uic`). numpy / scipy / scikit-learn only: callers
convert tensors. Every metric is a fraction; NMI and AMI use the arithmetic mean of the two entropies
(scikit-learn's default).

* Scalar, from two labelings (`nmi`, `ami`, `ari`, `acc_one_to_one`, `acc_many_to_one`, `clustering_metrics`):
  scikit-learn's public functions; the accuracies from scikit-learn's contingency matrix (Hungarian: scipy).
* Batched, from a stack of contingency tables [R, classes, clusters], one per bootstrap resample of the test
  images (`resampled_contingencies`, `batched_scores`): written by hand and vectorised over R, because
  scikit-learn scores one labeling at a time (~0.2 ms each: minutes for a report's resamples). On every
  table they equal the scalar forms on the resampled labels (tests/test_clustering_metrics.py).
* `expected_mutual_information` (AMI's chance term under the permutation model): its closed form from the
  marginals, by hand (scikit-learn keeps its own routine in a private module).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.special import gammaln
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

_EPS = np.finfo(np.float64).eps


# ------------------------------------------------------------------------------------------------ labels


def labels_array(x) -> np.ndarray:
    """Integer labels as an int64 array (shape kept); ValueError for any other dtype."""
    labels = np.asarray(x)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    return labels.astype(np.int64)


def index_labels(x) -> np.ndarray:
    """`labels_array`, also non-empty and non-negative: class / cluster indices that can address a table."""
    labels = labels_array(x)
    if labels.size == 0 or labels.min() < 0:
        raise ValueError("labels must be non-empty and non-negative (class / cluster indices)")
    return labels


def _pair(labels_true, labels_pred) -> tuple[np.ndarray, np.ndarray]:
    y, p = labels_array(labels_true).reshape(-1), labels_array(labels_pred).reshape(-1)
    if len(y) != len(p):
        raise ValueError(f"labels_true has {len(y)} entries but labels_pred has {len(p)}")
    if len(y) == 0:
        raise ValueError("no labels to compare")
    return y, p


# ------------------------------------------------------------------------------- scalar (scikit-learn)


def nmi(labels_true, labels_pred) -> float:
    return float(normalized_mutual_info_score(*_pair(labels_true, labels_pred)))


def ami(labels_true, labels_pred) -> float:
    """0 for chance; slightly below 0 for worse-than-chance assignments."""
    return float(adjusted_mutual_info_score(*_pair(labels_true, labels_pred)))


def ari(labels_true, labels_pred) -> float:
    """0 for chance; slightly below 0 for worse-than-chance assignments."""
    return float(adjusted_rand_score(*_pair(labels_true, labels_pred)))


def _matched(counts: np.ndarray) -> float:
    """Images on the best one-to-one matching of a [classes, clusters] table (Hungarian, maximising)."""
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum())


def acc_one_to_one(labels_true, labels_pred) -> float:
    """Best one-to-one matching of clusters to classes (Hungarian on the contingency matrix).

    With more clusters than classes only one cluster per class is matched; the images of the unmatched
    clusters count as wrong (the papers' over-clustering ACC).
    """
    y, p = _pair(labels_true, labels_pred)
    return _matched(contingency_matrix(y, p)) / len(y)


def acc_many_to_one(labels_true, labels_pred) -> float:
    """Each cluster mapped to its majority class (several clusters may share a class).

    The fair ACC of an over-clustering head. It rises with K (K = N scores 1), so it is reported only
    beside K and never compared with a one-to-one ACC.
    """
    y, p = _pair(labels_true, labels_pred)
    return float(contingency_matrix(y, p).max(axis=0).sum()) / len(y)


#: metric name -> scalar function of (labels_true, labels_pred); "acc" is the one-to-one ACC
SCALAR: dict[str, Callable[..., float]] = {
    "nmi": nmi, "ami": ami, "ari": ari, "acc": acc_one_to_one, "acc_many_to_one": acc_many_to_one,
}  # fmt: skip


def clustering_metrics(labels_true, labels_pred) -> dict[str, float]:
    """{"nmi", "ami", "ari", "acc"} (acc: one-to-one, Hungarian)."""
    y, p = _pair(labels_true, labels_pred)
    return {name: SCALAR[name](y, p) for name in ("nmi", "ami", "ari", "acc")}


def labelled_nmi(labels_true, labels_pred) -> float:
    """NMI over the entries that carry a label (labels_true >= 0; -1 marks an unlabelled image)."""
    y, p = _pair(labels_true, labels_pred)
    keep = y >= 0
    return nmi(y[keep], p[keep])


# ------------------------------------------------------------------------- expected mutual information


def expected_mutual_information(row_sums, col_sums) -> float:
    """E[MI] of two labelings with these cluster sizes under the permutation model (AMI's chance term).

    Closed form (Vinh, Epps & Bailey, JMLR 2010, Eq. 24), for N = sum(a) = sum(b):

        E[MI] = sum_ij sum_{n = max(1, a_i + b_j - N)}^{min(a_i, b_j)} n/N log(N n / (a_i b_j))
                       * a_i! b_j! (N - a_i)! (N - b_j)! / (N! n! (a_i - n)! (b_j - n)! (N - a_i - b_j + n)!)

    the factorials in log space (scipy.special.gammaln), every (i, j, n) term at once: at most
    min(classes, clusters) * N terms. Empty clusters are dropped; 0 when either side has one cluster.
    """
    a = np.asarray(row_sums, dtype=np.int64).reshape(-1)
    b = np.asarray(col_sums, dtype=np.int64).reshape(-1)
    a, b = a[a > 0], b[b > 0]
    n = int(a.sum())
    if n != int(b.sum()):
        raise ValueError(f"the marginals disagree on the number of items: {n} vs {int(b.sum())}")
    if len(a) <= 1 or len(b) <= 1:
        return 0.0
    ai, bj = (x.ravel() for x in np.meshgrid(a, b, indexing="ij"))
    start = np.maximum(1, ai + bj - n)
    width = np.maximum(np.minimum(ai, bj) - start + 1, 0)
    pair = np.repeat(np.arange(len(ai)), width)  # one entry per (i, j, n) term
    nij = start[pair] + np.arange(int(width.sum())) - np.repeat(np.cumsum(width) - width, width)
    ai, bj = ai[pair], bj[pair]
    log_term = np.log(n) + np.log(nij) - np.log(ai) - np.log(bj)
    log_prob = (gammaln(ai + 1) + gammaln(bj + 1) + gammaln(n - ai + 1) + gammaln(n - bj + 1) - gammaln(n + 1)
                - gammaln(nij + 1) - gammaln(ai - nij + 1) - gammaln(bj - nij + 1)
                - gammaln(n - ai - bj + nij + 1))
    return float(np.sum(nij / n * log_term * np.exp(log_prob)))


# -------------------------------------------------------------- batched over bootstrap contingency tables


def resampled_contingencies(labels_true, labels_pred, resamples, num_classes: int,
                            num_clusters: int) -> np.ndarray:
    """[R, num_classes, num_clusters] contingency tables (float) of the R resamples [R, n] of image indices,
    in one bincount. Labels are indices (`index_labels`) below num_classes / num_clusters; unused indices
    give zero rows / columns, which every metric ignores (as scikit-learn's relabelling does)."""
    y, p, block = np.asarray(labels_true), np.asarray(labels_pred), np.asarray(resamples)
    r = block.shape[0]
    flat = (np.arange(r)[:, None] * num_classes + y[block]) * num_clusters + p[block]
    return (np.bincount(flat.ravel(), minlength=r * num_classes * num_clusters)
            .reshape(r, num_classes, num_clusters).astype(np.float64))


def _xlogx(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)


def batched_scores(tables, metric: str, emi=None) -> np.ndarray:
    """A metric (fraction) of each table of tables [R, classes, clusters], vectorised over R (the
    Hungarian matching is solved per table). By hand: scikit-learn scores labelings, one at a time.

    AMI takes `emi`, the expected mutual information: a number (or [R]) to use for every table (the report
    uses the observed marginals' for all resamples), or None for each table's own (exact, a loop over R).
    """
    c = np.asarray(tables, dtype=np.float64)
    n = c.sum(axis=(1, 2))
    a, b = c.sum(axis=2), c.sum(axis=1)
    if metric == "acc_many_to_one":
        return c.max(axis=1).sum(axis=1) / n
    if metric == "acc":
        return np.array([_matched(m) for m in c]) / n
    if metric == "ari":  # Hubert & Arabie: (index - expected) / (max - expected), pairs counted
        index = (c * (c - 1)).sum(axis=(1, 2)) / 2
        sa, sb = (a * (a - 1)).sum(axis=1) / 2, (b * (b - 1)).sum(axis=1) / 2
        expected = sa * sb / (n * (n - 1) / 2)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = (index - expected) / ((sa + sb) / 2 - expected)
        return np.where((index == sa) & (sa == sb), 1.0, out)  # identical partitions, as scikit-learn
    if metric not in ("nmi", "ami"):
        raise ValueError(f"unknown clustering metric {metric!r}; known: {', '.join(SCALAR)}")
    # entropies and mutual information from counts: H = log n - sum x log x / n
    logn = np.log(n)
    xlogx_a, xlogx_b = _xlogx(a).sum(axis=1), _xlogx(b).sum(axis=1)
    mi = np.maximum(0.0, (_xlogx(c).sum(axis=(1, 2)) - xlogx_a - xlogx_b) / n + logn)
    ha, hb = logn - xlogx_a / n, logn - xlogx_b / n
    mean_h = (ha + hb) / 2
    if metric == "nmi":
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(mean_h > 0, mi / mean_h, 1.0)
    if emi is None:
        emi = np.array([expected_mutual_information(x, y) for x, y in zip(a, b)])
    # scikit-learn's guards: keep the signs, never divide 0 by 0 (a perfect match scores 1)
    num, den = mi - emi, mean_h - emi
    num = np.where(num < 0, np.minimum(num, -_EPS), np.maximum(num, _EPS))
    den = np.where(den < 0, np.minimum(den, -_EPS), np.maximum(den, _EPS))
    return num / den
