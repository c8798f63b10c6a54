"""Clustering quality on the test split: NMI, AMI, ARI (scikit-learn) and ACC (Hungarian matching).

Cluster assignments come from a method's own head (argmax of `cluster_logits`) or, for methods
without one, from FAISS k-means on l2-normalised backbone features with k = number of classes.
"""

from __future__ import annotations

import logging
import math

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

log = logging.getLogger("benchmarks")


def _as_labels(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    labels = np.asarray(x).reshape(-1)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    return labels.astype(np.int64)


def hungarian_accuracy(labels_true, labels_pred) -> float:
    """Best one-to-one matching of clusters to classes (Hungarian on the contingency matrix).

    With more clusters than classes only one cluster per class is matched; the images of the
    unmatched clusters count as wrong (the papers' over-clustering ACC). Returns a fraction.
    """
    y, p = _as_labels(labels_true), _as_labels(labels_pred)
    counts = contingency_matrix(y, p)  # [classes, clusters], both relabelled 0..n-1
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum()) / len(y)


def clustering_metrics(labels_true, labels_pred) -> dict[str, float]:
    """{"nmi", "ami", "ari", "acc"} as fractions (NMI/ACC in [0, 1]; AMI/ARI are 0 for chance and
    may dip slightly below 0 for worse-than-chance assignments, as scikit-learn defines them)."""
    y, p = _as_labels(labels_true), _as_labels(labels_pred)
    if len(y) != len(p):
        raise ValueError(f"labels_true has {len(y)} entries but labels_pred has {len(p)}")
    if len(y) == 0:
        raise ValueError("no labels to compare")
    return {
        "nmi": float(normalized_mutual_info_score(y, p)),
        "ami": float(adjusted_mutual_info_score(y, p)),
        "ari": float(adjusted_rand_score(y, p)),
        "acc": hungarian_accuracy(y, p),
    }


def as_percent_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Record form: NMI/AMI/ARI/ACC in percent, clipped to [0, 100] (the record schema's range;
    the raw fractions, negative AMI/ARI included, are kept in the record's `evaluation`)."""
    return {name.upper(): min(100.0, max(0.0, 100.0 * value)) for name, value in metrics.items()}


def kmeans_assign(features, k: int, seed: int = 0, niter: int = 100, nredo: int = 5,
                  spherical: bool = False) -> tuple[np.ndarray, dict]:
    """FAISS k-means on l2-normalised `features` (every point used, none subsampled).

    Returns (cluster index per point, the parameters used). The best of `nredo` seeded restarts
    (lowest objective) is kept. On a GPU where faiss-gpu exists.
    """
    x = F.normalize(torch.as_tensor(features).float(), dim=1).cpu().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, dim = x.shape
    if n < k:
        log.warning("clustering: %d points for k = %d clusters; using k = %d", n, k, n)
        k = n
    # FAISS subsamples to k * max_points_per_centroid points by default: allow all of them.
    max_points = math.ceil(n / k) + 1
    use_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    kmeans = faiss.Kmeans(dim, k, niter=niter, nredo=nredo, seed=seed, spherical=spherical,
                          max_points_per_centroid=max_points, min_points_per_centroid=1, verbose=False,
                          gpu=use_gpu)
    kmeans.train(x)
    _, assignment = kmeans.index.search(x, 1)
    params = {"algorithm": "faiss.Kmeans", "k": k, "niter": niter, "nredo": nredo, "seed": seed,
              "spherical": spherical, "max_points_per_centroid": max_points, "features": "l2-normalised backbone",
              "fitted_on": f"all {n} test images"}
    return assignment[:, 0].astype(np.int64), params
