"""kNN classifiers with FAISS: InstDisc's weighted vote (the suite's kNN) and SSL++'s plurality vote.

Weighted kNN (Wu et al. 2018, InstDisc): each test point's k nearest train points by cosine
similarity (inner product of l2-normalised features, exact FAISS index) vote for their class with
weight exp(sim / temperature). Queries go in chunks so memory stays bounded.

Plurality kNN (SSL++ sec. V-A.3 and Table V, "KNN (set K = 10)"): each of the k nearest train points
casts one vote; see `knn_plurality_predict` for the features, the distance and the tie rule.

FAISS runs on a GPU only where both a GPU build of FAISS and a GPU exist (`faiss_info`); otherwise
on the CPU, and the reason is logged once.
"""

from __future__ import annotations

import functools
import logging

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.errors import ConfigError

log = logging.getLogger("benchmarks")

QUERY_CHUNK = 4096
# FAISS-GPU's k-selection limit (GPU_MAX_SELECTION_K in faiss/gpu/utils/DeviceDefs.cuh; 2048 in the
# CUDA builds since FAISS 1.7, 1024 before): a GPU search with a larger k aborts inside FAISS.
FAISS_GPU_MAX_K = 2048
KNN_METRICS = ("cosine", "euclidean")


# ----------------------------------------------------------------------------- FAISS build and device


def _faiss_gpu_status() -> tuple[bool, int, str | None]:
    """(GPU build?, GPUs FAISS sees, why the CPU is used or None)."""
    gpu_build = hasattr(faiss, "StandardGpuResources")
    num_gpus = int(faiss.get_num_gpus()) if gpu_build and hasattr(faiss, "get_num_gpus") else 0
    if not gpu_build:
        reason = "the installed FAISS build has no GPU support (faiss-cpu)"
    elif num_gpus == 0:
        reason = "FAISS was built with GPU support but sees no GPU"
    else:
        reason = None
    return gpu_build, num_gpus, reason


def faiss_info() -> dict:
    """What the run record needs to say where the kNN / k-means ran: FAISS version, GPU build,
    GPUs FAISS sees, and the device the suite uses ("gpu" only when both exist, else "cpu")."""
    gpu_build, num_gpus, reason = _faiss_gpu_status()
    return {"faiss_version": faiss.__version__, "gpu_build": gpu_build, "num_gpus": num_gpus,
            "device": "cpu" if reason else "gpu", "cpu_reason": reason}


@functools.lru_cache(maxsize=1)
def faiss_use_gpu() -> bool:
    """True when FAISS indexes go on GPU 0. Decided (and the CPU fallback's reason logged) once per process."""
    _, _, reason = _faiss_gpu_status()
    if reason is None:
        return True
    # a warning only where a GPU would have been used by torch: a CPU-only machine is no surprise
    level = logging.WARNING if torch.cuda.is_available() else logging.INFO
    log.log(level, "evaluation: FAISS kNN/k-means run on the CPU: %s", reason)
    return False


def check_gpu_k(k: int, on_gpu: bool) -> None:
    """Refuse a k that FAISS-GPU cannot select (it would abort inside FAISS, not raise)."""
    if on_gpu and k > FAISS_GPU_MAX_K:
        raise ConfigError(f"evaluation.knn.ks: k = {k} exceeds FAISS-GPU's limit of {FAISS_GPU_MAX_K} neighbours; "
                          f"use k <= {FAISS_GPU_MAX_K} or run the kNN on the CPU")


@functools.lru_cache(maxsize=1)
def _gpu_resources():
    """One set of FAISS GPU resources per process (creating them costs a few hundred MB and ms)."""
    if faiss_use_gpu():
        return faiss.StandardGpuResources()
    return None


def build_index(features: np.ndarray, use_gpu: bool = True, metric: str = "cosine"):
    """Exact index: inner product (`cosine`, for l2-normalised features) or squared L2 (`euclidean`);
    on GPU 0 when `use_gpu` and FAISS can (see faiss_use_gpu)."""
    index = faiss.IndexFlatL2(features.shape[1]) if metric == "euclidean" else faiss.IndexFlatIP(features.shape[1])
    resources = _gpu_resources() if use_gpu else None
    if resources is not None:
        index = faiss.index_cpu_to_gpu(resources, 0, index)
    index.add(features)
    return index


# ----------------------------------------------------------------------------- inputs


def _as_float32(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_finite_rows(x: torch.Tensor, what: str) -> None:
    """NaN would otherwise normalise to NaN, match nothing and silently vote for class 0."""
    bad = int((~torch.isfinite(x)).flatten(1).any(dim=1).sum()) if x.numel() else 0
    if bad:
        raise ValueError(f"kNN: {bad} of {len(x)} {what} feature rows are not finite (NaN or inf)")


def _features(x, what: str) -> torch.Tensor:
    x = torch.as_tensor(x).detach().float().cpu()
    if x.dim() == 4:  # [N, C, H, W] block maps -> global average pool (SSL++ sec. V-B, Table VI)
        x = x.mean(dim=(2, 3))
    if x.dim() != 2:
        raise ValueError(f"kNN: {what} features must be [N, D] (or [N, C, H, W] maps), got {tuple(x.shape)}")
    _check_finite_rows(x, what)
    return x


# ----------------------------------------------------------------------------- weighted kNN (InstDisc)


def knn_classify(train_features, train_labels, test_features, num_classes: int, k: int,
                 temperature: float = 0.07) -> torch.Tensor:
    """Class scores [n_test, num_classes]: sum over the k nearest train points of exp(sim / T).

    Refuses (ValueError) features with NaN/inf rows: a NaN query matches nothing and would
    silently score as class 0.
    """
    train_t = _features(train_features, "train")
    test_t = _features(test_features, "test")
    labels = torch.as_tensor(train_labels, dtype=torch.long).cpu()
    if k < 1 or k > len(train_t):
        raise ConfigError(f"evaluation.knn.ks: k = {k} must be between 1 and the bank size ({len(train_t)})")
    if temperature <= 0:
        raise ConfigError(f"evaluation.knn.temperature: must be > 0, got {temperature}")
    on_gpu = faiss_use_gpu()
    check_gpu_k(k, on_gpu)
    train = _as_float32(F.normalize(train_t, dim=1))
    test = _as_float32(F.normalize(test_t, dim=1))
    index = build_index(train, use_gpu=on_gpu)
    scores = torch.zeros(len(test), num_classes, dtype=torch.float32)
    for start in range(0, len(test), QUERY_CHUNK):
        sims, nbrs = index.search(test[start:start + QUERY_CHUNK], k)
        weights = torch.exp(torch.from_numpy(sims) / temperature)
        scores[start:start + QUERY_CHUNK].scatter_add_(1, labels[torch.from_numpy(nbrs)], weights)
    return scores


def topk_predictions(scores: torch.Tensor, k: int, exclude_zero: bool = True) -> torch.Tensor:
    """The k best classes per row, LongTensor [n, k], with a deterministic tie rule.

    Classes are ranked by score (descending), ties by class index (ascending), so the result does
    not depend on torch.topk's unspecified tie order. With `exclude_zero` (kNN vote sums, where 0
    means no neighbour of that class among the k) a zero-score class never enters the top-k: its
    slots, and any slot beyond the number of classes, hold -1. Pass exclude_zero=False for logits.
    """
    scores = torch.as_tensor(scores).detach().float().cpu()
    if k < 1:
        raise ValueError(f"top-k needs k >= 1, got {k}")
    n, num_classes = scores.shape
    ranked = scores.masked_fill(scores == 0, float("-inf")) if exclude_zero else scores
    # a stable descending sort keeps equal scores in ascending class order
    values, order = torch.sort(ranked, dim=1, descending=True, stable=True)
    top = order[:, :k].clone()
    if exclude_zero:
        top[values[:, :k] == float("-inf")] = -1
    if k > num_classes:
        top = torch.cat([top, torch.full((n, k - num_classes), -1, dtype=torch.long)], dim=1)
    return top


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5), exclude_zero: bool = True
                  ) -> dict[str, float]:
    """Top-k accuracies in percent, from `topk_predictions` (its tie rule: higher score first, equal
    scores in ascending class index; zero-score classes, i.e. classes no neighbour voted for, never
    count as predicted, so top-5 with only 3 voted classes holds those 3)."""
    labels = torch.as_tensor(labels).cpu()
    result = {}
    for k in ks:
        top = topk_predictions(scores, k, exclude_zero=exclude_zero)
        hit = ((top == labels[:, None]) & (top >= 0)).any(dim=1)
        result[f"top{k}"] = 100.0 * hit.float().mean().item()
    return result


# ----------------------------------------------------------------------------- plurality kNN (SSL++)


def knn_plurality_predict(train_features, train_labels, test_features, num_classes: int, k: int = 10,
                          metric: str = "cosine") -> torch.Tensor:
    """SSL++'s model-free kNN (Table V, K = 10): predicted class per test point, LongTensor [n_test].

    Each of the k nearest train points casts one vote ("an image is classified by a plurality vote
    of its neighbours", sec. V-A.3). Features: one vector per image; [N, C, H, W] block maps are
    globally average-pooled first, as the paper's kNN is "based on the averaged-pooled feature
    representations" of a block (sec. V-B, Table VI). Distance: the paper does not name one; the
    only feature similarity it names is cosine (sec. V-B, retrieval in Fig. 4), so `cosine` (l2-
    normalised features, inner product) is the default; `euclidean` is plain L2 on the raw features.
    Tie rule (the paper gives none): among the classes with the most votes, the one whose nearest
    member among the k neighbours is closest wins; neighbours at equal distance are ordered by train
    index. The vote is hand-written (a few lines; FAISS only finds the neighbours).
    """
    if metric not in KNN_METRICS:
        raise ConfigError(f"evaluation.knn_k10.metric: got {metric!r}; allowed: {', '.join(KNN_METRICS)}")
    train_t = _features(train_features, "train")
    test_t = _features(test_features, "test")
    labels = torch.as_tensor(train_labels, dtype=torch.long).cpu().numpy()
    if k < 1 or k > len(train_t):
        raise ConfigError(f"evaluation.knn_k10.k: k = {k} must be between 1 and the bank size ({len(train_t)})")
    if len(labels) != len(train_t):
        raise ValueError(f"kNN: {len(labels)} train labels for {len(train_t)} train features")
    if metric == "cosine":
        train_t, test_t = F.normalize(train_t, dim=1), F.normalize(test_t, dim=1)
    on_gpu = faiss_use_gpu()
    check_gpu_k(k, on_gpu)
    index = build_index(_as_float32(train_t), use_gpu=on_gpu, metric=metric)
    test = _as_float32(test_t)
    predictions = np.empty(len(test), dtype=np.int64)
    rows = np.arange(k)
    for start in range(0, len(test), QUERY_CHUNK):
        dist, nbrs = index.search(test[start:start + QUERY_CHUNK], k)
        if metric == "cosine":
            dist = -dist  # similarity -> "smaller is closer"
        # nearest first; equal distances by train index (FAISS leaves their order unspecified)
        order = np.lexsort((nbrs, dist), axis=1)
        nbrs = np.take_along_axis(nbrs, order, axis=1)
        votes_of = labels[nbrs]  # [q, k] classes, nearest first
        counts = np.zeros((len(nbrs), num_classes), dtype=np.int64)
        np.add.at(counts, (np.repeat(np.arange(len(nbrs)), k), votes_of.ravel()), 1)
        # a neighbour wins if its class has the most votes; the first (nearest) such neighbour decides
        is_top = counts[np.arange(len(nbrs))[:, None], votes_of] == counts.max(axis=1, keepdims=True)
        first = np.where(is_top, rows, k).argmin(axis=1)
        predictions[start:start + len(nbrs)] = votes_of[np.arange(len(nbrs)), first]
    return torch.from_numpy(predictions)
