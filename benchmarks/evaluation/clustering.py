"""Clustering quality on the test split: NMI, AMI, ARI and ACC (Hungarian matching), as computed by
ssl_common.clustering_metrics (scikit-learn underneath).

The headline, identical for every method: FAISS k-means on l2-normalised backbone features with
k = number of classes (`kmeans_assign` + `clustering_metrics`). A method's own head (argmax of
`cluster_logits`) is scored beside it with `clustering_metrics_for_head`: a head with K = classes
gets the one-to-one ACC, an over-clustering head (K > classes, e.g. SSL++'s 70 IIC clusters) a
many-to-one ACC instead (one-to-one ACC would measure K, not quality; DESIGN.md, Protocols).
"""

from __future__ import annotations

import logging
import math

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.evaluation.knn import faiss_use_gpu
from ssl_common import clustering_metrics as scores

log = logging.getLogger("benchmarks")


def _as_labels(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return scores.labels_array(x).reshape(-1)


def hungarian_accuracy(labels_true, labels_pred) -> float:
    """Best one-to-one matching of clusters to classes (Hungarian on the contingency matrix).

    With more clusters than classes only one cluster per class is matched; the images of the
    unmatched clusters count as wrong (the papers' over-clustering ACC). Returns a fraction.
    """
    return scores.acc_one_to_one(_as_labels(labels_true), _as_labels(labels_pred))


def many_to_one_accuracy(labels_true, labels_pred) -> float:
    """Each cluster mapped to its majority class (several clusters may share a class); a fraction.

    The fair ACC of an over-clustering head. It rises with K (K = N scores 1), so it is reported
    only beside K and never compared with a one-to-one ACC.
    """
    return scores.acc_many_to_one(_as_labels(labels_true), _as_labels(labels_pred))


def clustering_metrics(labels_true, labels_pred) -> dict[str, float]:
    """{"nmi", "ami", "ari", "acc"} as fractions (NMI/ACC in [0, 1]; AMI/ARI are 0 for chance and
    may dip slightly below 0 for worse-than-chance assignments, as scikit-learn defines them).
    Computed by ssl_common.clustering_metrics, the one implementation of these metrics."""
    return scores.clustering_metrics(_as_labels(labels_true), _as_labels(labels_pred))


def clustering_metrics_for_head(labels_true, labels_pred, num_classes: int, num_clusters: int) -> dict[str, float]:
    """A method's own head: {"nmi", "ami", "ari"} plus "acc" (one-to-one, Hungarian) when the head has
    K = num_classes clusters, else "acc_many_to_one" (and no "acc": with K != classes a one-to-one
    matching leaves clusters unmatched and measures K, not quality). Fractions."""
    y, p = _as_labels(labels_true), _as_labels(labels_pred)
    if num_clusters < 1 or num_classes < 1:
        raise ValueError(f"need num_classes >= 1 and num_clusters >= 1, got {num_classes} and {num_clusters}")
    if len(p) and (p.min() < 0 or p.max() >= num_clusters):
        raise ValueError(f"cluster ids must be in [0, {num_clusters}), got {p.min()}..{p.max()}")
    metrics = clustering_metrics(y, p)
    if num_clusters != num_classes:
        del metrics["acc"]
        metrics["acc_many_to_one"] = many_to_one_accuracy(y, p)
    return metrics


def as_percent_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Record form: the metrics in percent, keys upper-cased (ACC_MANY_TO_ONE for a head's).

    Negative AMI/ARI (worse than chance) are kept as computed, as the record schema allows
    [-100, 100]; only float noise beyond +-100 (e.g. NMI = 1.0000000001) is clipped.
    """
    return {name.upper(): min(100.0, max(-100.0, 100.0 * value)) for name, value in metrics.items()}


def kmeans_assign(features, k: int, seed: int = 0, niter: int = 100, nredo: int = 5,
                  spherical: bool = False) -> tuple[np.ndarray, dict]:
    """FAISS k-means on l2-normalised `features` (every point used, none subsampled).

    Returns (cluster index per point, the parameters used, with the FAISS device). The best of
    `nredo` seeded restarts (lowest objective) is kept. On a GPU only where a GPU build of FAISS and
    a GPU exist (benchmarks.evaluation.knn.faiss_use_gpu), else on the CPU.
    """
    x = torch.as_tensor(features).detach().float().cpu()
    bad = int((~torch.isfinite(x)).flatten(1).any(dim=1).sum()) if x.numel() else 0
    if bad:
        raise ValueError(f"k-means: {bad} of {len(x)} feature rows are not finite (NaN or inf)")
    x = F.normalize(x, dim=1).numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, dim = x.shape
    if n < k:
        log.warning("clustering: %d points for k = %d clusters; using k = %d", n, k, n)
        k = n
    # FAISS subsamples to k * max_points_per_centroid points by default: allow all of them.
    max_points = math.ceil(n / k) + 1
    use_gpu = faiss_use_gpu()
    kmeans = faiss.Kmeans(dim, k, niter=niter, nredo=nredo, seed=seed, spherical=spherical,
                          max_points_per_centroid=max_points, min_points_per_centroid=1, verbose=False,
                          gpu=use_gpu)
    kmeans.train(x)
    _, assignment = kmeans.index.search(x, 1)
    params = {"algorithm": "faiss.Kmeans", "k": k, "niter": niter, "nredo": nredo, "seed": seed,
              "spherical": spherical, "max_points_per_centroid": max_points, "features": "l2-normalised backbone",
              "fitted_on": f"all {n} test images",
              "faiss_device": "gpu" if use_gpu else "cpu"}
    return assignment[:, 0].astype(np.int64), params
