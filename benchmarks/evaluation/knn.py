"""Weighted kNN classification (InstDisc, Wu et al. 2018) with FAISS.

Each test point's k nearest train points by cosine similarity (inner product of
l2-normalised features, exact FAISS index) vote for their class with weight
exp(sim / temperature). Queries go in chunks so memory stays bounded.
"""

from __future__ import annotations

import functools

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.errors import ConfigError

QUERY_CHUNK = 4096


@functools.lru_cache(maxsize=1)
def _gpu_resources():
    """One set of FAISS GPU resources per process (creating them costs a few hundred MB and ms)."""
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return faiss.StandardGpuResources()
    return None


def build_index(features: np.ndarray, use_gpu: bool = True):
    """Exact inner-product index (on a GPU where faiss-gpu and a GPU exist)."""
    index = faiss.IndexFlatIP(features.shape[1])
    resources = _gpu_resources() if use_gpu else None
    if resources is not None:
        index = faiss.index_cpu_to_gpu(resources, 0, index)
    index.add(features)
    return index


def _as_float32(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def knn_classify(train_features, train_labels, test_features, num_classes: int, k: int,
                 temperature: float = 0.1) -> torch.Tensor:
    """Class scores [n_test, num_classes]: sum over the k nearest train points of exp(sim / T)."""
    train = _as_float32(F.normalize(torch.as_tensor(train_features).float(), dim=1))
    test = _as_float32(F.normalize(torch.as_tensor(test_features).float(), dim=1))
    labels = torch.as_tensor(train_labels, dtype=torch.long).cpu()
    if k < 1 or k > len(train):
        raise ConfigError(f"evaluation.knn.ks: k = {k} must be between 1 and the bank size ({len(train)})")
    if temperature <= 0:
        raise ConfigError(f"evaluation.knn.temperature: must be > 0, got {temperature}")
    index = build_index(train)
    scores = torch.zeros(len(test), num_classes, dtype=torch.float32)
    for start in range(0, len(test), QUERY_CHUNK):
        sims, nbrs = index.search(test[start:start + QUERY_CHUNK], k)
        weights = torch.exp(torch.from_numpy(sims) / temperature)
        scores[start:start + QUERY_CHUNK].scatter_add_(1, labels[torch.from_numpy(nbrs)], weights)
    return scores


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Top-k accuracies in percent; ties in scores broken by class index (torch.topk order)."""
    labels = torch.as_tensor(labels).cpu()
    result = {}
    for k in ks:
        k_eff = min(k, scores.shape[1])
        top = scores.topk(k_eff, dim=1).indices
        result[f"top{k}"] = 100.0 * (top == labels[:, None]).any(dim=1).float().mean().item()
    return result
