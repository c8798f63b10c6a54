"""Speed of the kNN neighbour search: FAISS (what knn_classify uses) vs scikit-learn's brute-force
NearestNeighbors (cosine) vs torch matmul + topk; a 50k x 512 bank, 10k queries, k = 200.

Skipped by `pytest tests` (--benchmark-skip); run with `tox -e bench`. One round each: the
timings are for the README, no speed assertions. Each benchmark checks its neighbours against
FAISS's, so a fast but wrong search cannot pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.evaluation.knn import QUERY_CHUNK, build_index, knn_classify

BANK, QUERIES, DIM, K, CLASSES = 50_000, 10_000, 512, 200, 10


@pytest.fixture(scope="module")
def features():
    generator = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(BANK, DIM, generator=generator), dim=1)
    queries = F.normalize(torch.randn(QUERIES, DIM, generator=generator), dim=1)
    labels = torch.randint(0, CLASSES, (BANK,), generator=generator)
    return bank, queries, labels


@pytest.fixture(scope="module")
def faiss_neighbours(features):
    bank, queries, _ = features
    index = build_index(bank.numpy())
    return np.concatenate([index.search(queries[i:i + QUERY_CHUNK].numpy(), K)[1]
                           for i in range(0, QUERIES, QUERY_CHUNK)])


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean fraction of shared neighbours per query (order-free: ties may swap ranks)."""
    return float(np.mean([len(np.intersect1d(x, y)) / K for x, y in zip(a[:500], b[:500])]))


def faiss_search(bank, queries):
    index = build_index(bank.numpy())
    return np.concatenate([index.search(queries[i:i + QUERY_CHUNK].numpy(), K)[1]
                           for i in range(0, QUERIES, QUERY_CHUNK)])


def sklearn_search(bank, queries):
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=K, algorithm="brute", metric="cosine").fit(bank.numpy())
    return nn.kneighbors(queries.numpy(), return_distance=False)


def torch_search(bank, queries):
    return torch.cat([(queries[i:i + QUERY_CHUNK] @ bank.T).topk(K, dim=1).indices
                      for i in range(0, QUERIES, QUERY_CHUNK)]).numpy()


@pytest.mark.parametrize("name,search", [("faiss", faiss_search), ("sklearn_brute_cosine", sklearn_search),
                                         ("torch_matmul_topk", torch_search)])
def test_knn_search_speed(benchmark, features, faiss_neighbours, name, search):
    bank, queries, _ = features
    benchmark.extra_info.update({"bank": BANK, "queries": QUERIES, "dim": DIM, "k": K,
                                 "threads": torch.get_num_threads()})
    neighbours = benchmark.pedantic(search, args=(bank, queries), rounds=1, iterations=1, warmup_rounds=0)
    assert neighbours.shape == (QUERIES, K)
    assert overlap(neighbours, faiss_neighbours) > 0.99


def test_knn_classify_speed(benchmark, features):
    """The whole protocol step (index + search + weighted votes) as evaluate_model runs it."""
    bank, queries, labels = features
    scores = benchmark.pedantic(knn_classify, args=(bank, labels, queries, CLASSES, K, 0.1), rounds=1, iterations=1)
    assert scores.shape == (QUERIES, CLASSES)
