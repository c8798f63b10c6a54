"""k-means for the clustering protocol: FAISS (benchmarks.evaluation.clustering.kmeans_assign) against
scikit-learn's KMeans on the same data, k and number of Lloyd iterations.

Data shaped like the protocol's input: 10,000 l2-normalised 512-d features (a CIFAR test split through
ResNet-18) drawn around 10 weak class centres (weak enough that neither stops before `niter`), clustered with k = 10 (CIFAR-10) and k = 100 (CIFAR-100
over-clustering). Both start from k random points (sklearn init="random"), run one restart, use every
point (kmeans_assign disables FAISS's subsampling) and then assign every point. FAISS always runs
`niter` iterations; scikit-learn stops early only once no label changes (tol=0), so the time is filed
per iteration actually run. Each benchmark also checks that the two reach objectives within 5% of each
other, so a fast but wrong clustering cannot pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.evaluation.clustering import kmeans_assign

POINTS, DIM, CLASSES, NITER = 10_000, 512, 10, 20


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(CLASSES, DIM, generator=generator)
    labels = torch.randint(0, CLASSES, (POINTS,), generator=generator)
    x = centres[labels] + 10.0 * torch.randn(POINTS, DIM, generator=generator)  # weak: no early stop
    return F.normalize(x, dim=1).numpy()


def inertia(x: np.ndarray, assignment: np.ndarray, k: int) -> float:
    """Sum of squared distances to the cluster means (the k-means objective of an assignment)."""
    total = 0.0
    for c in range(k):
        members = x[assignment == c]
        if len(members):
            total += float(((members - members.mean(axis=0)) ** 2).sum())
    return total


def faiss_kmeans(x: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    assignment, params = kmeans_assign(x, k, seed=0, niter=NITER, nredo=1)
    return assignment, params["niter"]


def sklearn_kmeans(x: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, init="random", n_init=1, max_iter=NITER, tol=0.0, algorithm="lloyd",
                random_state=0).fit(x)
    return km.labels_.astype(np.int64), int(km.n_iter_)


IMPLEMENTATIONS = {"faiss": faiss_kmeans, "sklearn": sklearn_kmeans}


@pytest.fixture(scope="module")
def reference_inertia(features):
    return {k: inertia(features, sklearn_kmeans(features, k)[0], k) for k in (10, 100)}


@pytest.mark.parametrize("k", [10, 100])
@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_kmeans(benchmark, features, reference_inertia, speed_record, name, k, torch_threads):
    assignment, iterations = benchmark.pedantic(IMPLEMENTATIONS[name], args=(features, k), rounds=5,
                                                warmup_rounds=1, iterations=1)
    assert assignment.shape == (POINTS,) and len(np.unique(assignment)) == k
    assert inertia(features, assignment, k) <= 1.05 * reference_inertia[k]
    assert inertia(features, assignment, k) >= 0.95 * reference_inertia[k]
    speed_record(benchmark, f"kmeans_iteration[{name}-k{k}]", iterations, "Lloyd iteration", points=POINTS,
                 dim=DIM, k=k, threads=torch_threads)
