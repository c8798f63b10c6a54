"""Evaluation primitives: top-k tie rule, non-finite features, head clustering metrics, FAISS device
info and the GPU k limit, SSL++'s plurality kNN, and the NIN block classifier. Tiny tensors only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.backbones import small_cnn
from benchmarks.errors import BenchmarkError, ConfigError
from benchmarks.evaluation.block_classifier import (
    BlockClassifier,
    block_classifier_accuracy,
    block_classifier_probe,
    train_block_classifier,
)
from benchmarks.evaluation.clustering import (
    as_percent_metrics,
    clustering_metrics,
    clustering_metrics_for_head,
    hungarian_accuracy,
    kmeans_assign,
    many_to_one_accuracy,
)
from benchmarks.evaluation.features import NonFiniteFeaturesError, check_finite
from benchmarks.evaluation.knn import (
    FAISS_GPU_MAX_K,
    check_gpu_k,
    faiss_info,
    knn_classify,
    knn_plurality_predict,
    topk_accuracy,
    topk_predictions,
)
from benchmarks.evaluation.linear import Labelled

# ----------------------------------------------------------------------------- top-k tie rule


def test_topk_predictions_hand_case():
    scores = torch.tensor([[2.0, 5.0, 5.0, 0.0, 1.0],
                           [0.0, 0.0, 3.0, 0.0, 0.0],
                           [1.0, 1.0, 1.0, 1.0, 1.0]])
    # votes descending, ties by ascending class index; zero-vote classes never enter (-1)
    assert topk_predictions(scores, 5).tolist() == [[1, 2, 0, 4, -1], [2, -1, -1, -1, -1], [0, 1, 2, 3, 4]]
    assert topk_predictions(scores, 2).tolist() == [[1, 2], [2, -1], [0, 1]]
    # k beyond the number of classes: padded with -1
    assert topk_predictions(scores, 7)[1].tolist() == [2, -1, -1, -1, -1, -1, -1]
    # logits: zeros are ordinary scores
    assert topk_predictions(torch.tensor([[0.0, -1.0, 0.0]]), 3, exclude_zero=False).tolist() == [[0, 2, 1]]
    # a label that got no vote is not a top-5 hit (torch.topk would pad top-5 with zero-vote classes)
    labels = torch.tensor([3, 0, 4])
    assert topk_accuracy(scores, labels, ks=(1, 5)) == pytest.approx({"top1": 0.0, "top5": 100.0 / 3})


def permute_classes(scores: torch.Tensor, labels: torch.Tensor, perm: torch.Tensor):
    """Relabel class c as perm[c]: column c of the scores moves to column perm[c]."""
    out = torch.empty_like(scores)
    out[:, perm] = scores
    return out, perm[labels]


def test_top5_accuracy_does_not_depend_on_the_class_order():
    gen = torch.Generator().manual_seed(0)
    n, num_classes = 300, 10
    scores = torch.zeros(n, num_classes)
    for row in scores:  # at most 3 voted classes per row, with ties (integer votes)
        voted = torch.randperm(num_classes, generator=gen)[:int(torch.randint(1, 4, (1,), generator=gen))]
        row[voted] = torch.randint(1, 3, (len(voted),), generator=gen).float()
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    expected = topk_accuracy(scores, labels, ks=(5,))["top5"]
    naive = []
    for _ in range(5):
        perm = torch.randperm(num_classes, generator=gen)
        p_scores, p_labels = permute_classes(scores, labels, perm)
        assert topk_accuracy(p_scores, p_labels, ks=(5,))["top5"] == pytest.approx(expected)
        naive.append((p_scores.topk(5, dim=1).indices == p_labels[:, None]).any(dim=1).float().mean().item())
    assert len(set(naive)) > 1  # the old rule (zero-vote classes fill the top-5) did depend on it


def test_knn_top5_with_fewer_voted_classes_than_five_is_order_free():
    rng = np.random.default_rng(0)
    train = torch.from_numpy(rng.normal(size=(60, 8)).astype(np.float32))
    test = torch.from_numpy(rng.normal(size=(30, 8)).astype(np.float32))
    train_labels = torch.from_numpy(rng.integers(0, 8, size=60))
    test_labels = torch.from_numpy(rng.integers(0, 8, size=30))
    scores = knn_classify(train, train_labels, test, 8, k=3)
    top = topk_predictions(scores, 5)
    assert ((top >= 0).sum(dim=1) <= 3).all()  # only the classes of the 3 neighbours
    perm = torch.from_numpy(rng.permutation(8))
    again = knn_classify(train, perm[train_labels], test, 8, k=3)
    assert topk_accuracy(again, perm[test_labels], ks=(5,)) == topk_accuracy(scores, test_labels, ks=(5,))


# ----------------------------------------------------------------------------- non-finite features


def test_check_finite_names_method_protocol_split_and_count():
    feats = torch.randn(360, 4)
    feats[[5, 17, 300], 1] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    with pytest.raises(NonFiniteFeaturesError) as info:
        check_finite(feats, method="simclr", protocol="knn", split="test")
    assert str(info.value) == ("evaluation: method 'simclr', protocol knn: 3 of 360 test feature rows are not finite "
                               "(NaN or inf); the backbone's features are broken (a diverged run?), so no metric "
                               "is computed")
    assert isinstance(info.value, BenchmarkError) and isinstance(info.value, FloatingPointError)
    good = torch.randn(5, 3)
    assert check_finite(good, method="m", protocol="linear", split="train") is good
    # per-stage features: an image bad in any stage counts once
    stages = [torch.randn(10, 2), torch.randn(10, 3, 2, 2)]
    stages[0][1, 0] = float("nan")
    stages[1][1, 0, 0, 0] = float("nan")
    stages[1][4, 2, 1, 1] = float("inf")
    with pytest.raises(NonFiniteFeaturesError, match="2 of 10 train feature rows"):
        check_finite(stages, method="m", protocol="per_layer", split="train")


def test_knn_refuses_nan_instead_of_voting_class_zero():
    train, test = torch.randn(20, 4), torch.randn(6, 4)
    labels = torch.arange(20) % 3
    bad_test = test.clone()
    bad_test[[0, 2]] = float("nan")
    with pytest.raises(ValueError, match="2 of 6 test feature rows are not finite"):
        knn_classify(train, labels, bad_test, 3, k=5)
    bad_train = train.clone()
    bad_train[7, 1] = float("inf")
    with pytest.raises(ValueError, match="1 of 20 train feature rows are not finite"):
        knn_classify(bad_train, labels, test, 3, k=5)
    with pytest.raises(ValueError, match="not finite"):
        knn_plurality_predict(train, labels, bad_test, 3)


# ----------------------------------------------------------------------------- clustering


def test_many_to_one_hand_case():
    y = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([5, 5, 7, 7, 7, 9])  # cluster 5 -> 0 (2), 7 -> 1 (2 of 3), 9 -> 2 (1)
    assert many_to_one_accuracy(y, pred) == pytest.approx(5 / 6)


def test_pure_over_clustering_head_gets_many_to_one_acc_only():
    y = np.repeat(np.arange(10), 30)  # 10 classes of 30 images
    pred = y * 3 + np.tile(np.arange(3), 100)  # K = 30: each class split into 3 pure clusters
    assert many_to_one_accuracy(y, pred) == pytest.approx(1.0)
    assert hungarian_accuracy(y, pred) == pytest.approx(1 / 3)  # one-to-one would measure K
    head = clustering_metrics_for_head(y, pred, num_classes=10, num_clusters=30)
    assert set(head) == {"nmi", "ami", "ari", "acc_many_to_one"}
    assert head["acc_many_to_one"] == pytest.approx(1.0)
    assert as_percent_metrics(head)["ACC_MANY_TO_ONE"] == pytest.approx(100.0)
    # K = classes: the one-to-one ACC, as in clustering_metrics
    same = clustering_metrics_for_head(y, y[::-1].copy(), num_classes=10, num_clusters=10)
    assert set(same) == {"nmi", "ami", "ari", "acc"}
    with pytest.raises(ValueError, match=r"cluster ids must be in \[0, 30\)"):
        clustering_metrics_for_head(y, pred + 1, num_classes=10, num_clusters=30)


def test_percent_metrics_keep_negative_ami_ari():
    out = as_percent_metrics({"nmi": 1.0000000001, "ami": -0.01, "ari": -0.25, "acc": 0.5})
    assert out == pytest.approx({"NMI": 100.0, "AMI": -1.0, "ARI": -25.0, "ACC": 50.0})


def test_kmeans_headline_does_not_depend_on_a_head():
    rng = np.random.default_rng(0)
    centres = np.linalg.qr(rng.normal(size=(12, 12)))[0][:4] * 5
    y = np.repeat(np.arange(4), 40)
    x = torch.from_numpy((centres[y] + 0.05 * rng.normal(size=(len(y), 12))).astype(np.float32))
    first, params = kmeans_assign(x, 4, seed=0, niter=20, nredo=2)
    headline = clustering_metrics(y, first)
    assert set(headline) == {"nmi", "ami", "ari", "acc"} and headline["acc"] > 0.99
    assert params["faiss_device"] == faiss_info()["device"]
    head = clustering_metrics_for_head(y, rng.integers(0, 12, size=len(y)), num_classes=4, num_clusters=12)
    assert "acc" not in head
    again, _ = kmeans_assign(x, 4, seed=0, niter=20, nredo=2)
    np.testing.assert_array_equal(first, again)
    assert clustering_metrics(y, again) == headline


# ----------------------------------------------------------------------------- FAISS build and device


def test_faiss_info_and_the_gpu_k_limit():
    info = faiss_info()
    assert set(info) >= {"faiss_version", "gpu_build", "num_gpus", "device"}
    assert info["device"] in ("cpu", "gpu")
    assert info["device"] == ("gpu" if info["gpu_build"] and info["num_gpus"] > 0 else "cpu")
    with pytest.raises(ConfigError) as err:
        check_gpu_k(5000, on_gpu=True)
    assert str(err.value) == ("evaluation.knn.ks: k = 5000 exceeds FAISS-GPU's limit of 2048 neighbours; use k <= 2048 "
                              "or run the kNN on the CPU")
    check_gpu_k(FAISS_GPU_MAX_K, on_gpu=True)
    check_gpu_k(5000, on_gpu=False)


# ----------------------------------------------------------------------------- plurality kNN (SSL++ Table V)


def brute_force_plurality(train, labels, test, num_classes, k, metric):
    """Independent reference: full distance matrix, nearest first (ties by index), majority, and among
    the tied classes the one met first walking out from the query."""
    if metric == "cosine":
        train = train / np.linalg.norm(train, axis=1, keepdims=True)
        test = test / np.linalg.norm(test, axis=1, keepdims=True)
        dist = -(test @ train.T)
    else:
        dist = ((test[:, None, :] - train[None, :, :]) ** 2).sum(-1)
    out = []
    for row in dist:
        nearest = sorted(range(len(train)), key=lambda j: (row[j], j))[:k]
        votes = np.bincount(labels[nearest], minlength=num_classes)
        out.append(next(labels[j] for j in nearest if votes[labels[j]] == votes.max()))
    return np.array(out)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_plurality_knn_matches_brute_force(metric):
    rng = np.random.default_rng(1)
    train = rng.normal(size=(200, 6))
    test = rng.normal(size=(50, 6))
    labels = rng.integers(0, 4, size=200)  # 10 votes over 4 classes: ties are frequent
    got = knn_plurality_predict(torch.from_numpy(train), torch.from_numpy(labels), torch.from_numpy(test), 4,
                                k=10, metric=metric)
    expected = brute_force_plurality(train.astype(np.float32).astype(np.float64), labels,
                                     test.astype(np.float32).astype(np.float64), 4, 10, metric)
    assert got.dtype == torch.long and got.shape == (50,)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_plurality_knn_tie_goes_to_the_class_with_the_nearest_member():
    # along a line from the query at 0: distances 1, 2, 3, 4 with classes [3, 1, 1, 3]: 2 votes each
    train = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0], [50.0, 0.0]])
    labels = torch.tensor([3, 1, 1, 3, 0])
    queries = torch.tensor([[0.0, 0.0], [2.4, 0.0]])  # second: nearest 2 (1), 3 (1), 1 (3), 4 (3)
    assert knn_plurality_predict(train, labels, queries, 4, k=4, metric="euclidean").tolist() == [3, 1]
    # a clear majority beats the nearest neighbour
    assert knn_plurality_predict(train, labels, queries[:1], 4, k=3, metric="euclidean").tolist() == [1]


def test_plurality_knn_pools_block_maps():
    rng = np.random.default_rng(2)
    maps_train = torch.from_numpy(rng.normal(size=(40, 3, 2, 2)).astype(np.float32))
    maps_test = torch.from_numpy(rng.normal(size=(10, 3, 2, 2)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 3, size=40))
    pooled = knn_plurality_predict(maps_train.mean(dim=(2, 3)), labels, maps_test.mean(dim=(2, 3)), 3)
    assert torch.equal(knn_plurality_predict(maps_train, labels, maps_test, 3), pooled)


# ----------------------------------------------------------------------------- block classifier (Table III)


def test_block_classifier_is_rotnets_nin_block():
    model = BlockClassifier(192, 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (192, 192, (3, 3)), (192, 192, (1, 1)), (192, 192, (1, 1))]
    assert (model.linear.in_features, model.linear.out_features) == (192, 10)
    assert model(torch.randn(2, 192, 8, 8)).shape == (2, 10)


def test_block_classifier_trains_on_frozen_backbone_maps():
    torch.manual_seed(0)
    backbone = small_cnn(in_channels=1, width=4)
    images = torch.randn(16, 1, 8, 8)
    maps = backbone.forward_stages(images)[1]  # [16, 8, 4, 4], still attached to the backbone's graph
    assert maps.requires_grad
    before = {k: v.clone() for k, v in backbone.state_dict().items()}  # after the forward's BN update
    budget = dict(epochs=2, batch_size=8, lr=0.05, milestones=[1], width=8)
    model = train_block_classifier(maps, torch.arange(16) % 2, 2, budget, seed=3)
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert all(p.grad is None for p in backbone.parameters())
    rng_state = torch.get_rng_state()
    again = train_block_classifier(maps, torch.arange(16) % 2, 2, budget, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's RNG is untouched
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), again.state_dict().values()))


def separable_maps(n_per_class: int, num_classes: int, seed: int):
    """[N, 4, 4, 4] maps: class c lights up channel c (plus noise)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    maps = 0.3 * torch.randn(len(labels), 4, 4, 4, generator=gen)
    maps[torch.arange(len(labels)), labels] += 1.0
    return maps, labels


def test_block_classifier_learns_a_separable_problem():
    train, train_labels = separable_maps(24, 3, seed=0)
    test, test_labels = separable_maps(10, 3, seed=1)
    model = train_block_classifier(train, train_labels, 3, dict(epochs=12, batch_size=16, lr=0.05, milestones=[8],
                                                                width=16), seed=0)
    assert block_classifier_accuracy(model, test, test_labels)["top1"] > 90.0
    budget = {"epochs": 12, "batch_size": 16, "lr": 0.05, "milestones": [8], "width": 16}
    metrics, params = block_classifier_probe(Labelled(train, train_labels), Labelled(test, test_labels), 3, budget,
                                             seed=0)
    assert metrics["top1"] > 90.0 and params["gamma"] == 0.1 and params["input_shape"] == [4, 4, 4]
    assert math.isclose(params["weight_decay"], 5e-4)
    with pytest.raises(ConfigError, match="evaluation.block_classifier.epoch: unknown key"):
        block_classifier_probe(Labelled(train, train_labels), Labelled(test, test_labels), 3, {"epoch": 3})
