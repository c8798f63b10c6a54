"""Evaluation protocols: kNN, clustering metrics, linear probe, semi-supervised subsets, per-layer
probes, k-means clustering, evaluate_model end to end on synthetic data."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.backbones import small_cnn
from benchmarks.data import ImageDataset
from benchmarks.errors import ConfigError
from benchmarks.evaluation import semi
from benchmarks.evaluation.clustering import (
    as_percent_metrics,
    clustering_metrics,
    hungarian_accuracy,
    kmeans_assign,
)
from benchmarks.evaluation.features import NonFiniteFeaturesError
from benchmarks.evaluation.knn import knn_classify, topk_accuracy
from benchmarks.evaluation.linear import Labelled, fit_linear_classifier, linear_probe, predict
from benchmarks.evaluation.protocols import EvalContext, evaluate_model, resolve_evaluation
from benchmarks.evaluation.settings import EvaluationConfig
from benchmarks.evaluation.transfer import adapt_channels, transfer_preprocess

# ----------------------------------------------------------------------------- kNN


def brute_force_knn(train, train_labels, test, num_classes, k, temperature):
    """Independent numpy reference: full similarity matrix, argsort, weighted votes."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    sims = test @ train.T
    scores = np.zeros((len(test), num_classes))
    for i in range(len(test)):
        nearest = np.argsort(-sims[i])[:k]
        for j in nearest:
            scores[i, train_labels[j]] += np.exp(sims[i, j] / temperature)
    return scores


@pytest.mark.parametrize("k", [1, 5, 20, 200])
def test_knn_matches_brute_force(k):
    rng = np.random.default_rng(k)
    train = rng.normal(size=(300, 24)).astype(np.float32)
    test = rng.normal(size=(40, 24)).astype(np.float32)
    labels = rng.integers(0, 7, size=300)
    got = knn_classify(torch.from_numpy(train) * 3.0, torch.from_numpy(labels), torch.from_numpy(test), 7, k, 0.1)
    expected = brute_force_knn(train.astype(np.float64), labels, test.astype(np.float64), 7, k, 0.1)
    assert got.shape == (40, 7)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4)


def test_knn_refuses_k_larger_than_bank():
    with pytest.raises(ConfigError, match="evaluation.knn.ks"):
        knn_classify(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), torch.randn(2, 3), 2, k=6)


def test_topk_accuracy_hand_computed():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.04, 0.06], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    labels = torch.tensor([1, 2, 0, 2])
    # top-1 hits: row 0; top-2 hits: rows 0 ({1, 2}) and 1 ({0, 2})
    assert topk_accuracy(scores, labels, ks=(1, 2)) == pytest.approx({"top1": 25.0, "top2": 50.0})


# ----------------------------------------------------------------------------- clustering metrics


def test_permuted_perfect_clustering_scores_one():
    y = np.repeat(np.arange(4), 5)
    pred = np.array([3, 0, 2, 1])[y] + 10  # relabelled, arbitrary ids
    metrics = clustering_metrics(y, pred)
    assert metrics == pytest.approx({"nmi": 1.0, "ami": 1.0, "ari": 1.0, "acc": 1.0})


def test_over_clustering_three_times_the_classes():
    # 3 classes of 6 images, each split into 3 pure clusters: sizes (4,1,1), (3,2,1), (2,2,2)
    y = np.repeat([0, 1, 2], 6)
    pred = np.array([0, 0, 0, 0, 1, 2, 3, 3, 3, 4, 4, 5, 6, 6, 7, 7, 8, 8])
    m = clustering_metrics(y, pred)
    # ACC: one cluster per class (4 + 3 + 2 images), the other 6 clusters' images count wrong
    assert m["acc"] == pytest.approx(9 / 18)
    # ARI by hand: index = sum C(n_ij, 2) = 6+3+1+1+1+1 = 13; rows 3*C(6,2) = 45; cols = 13; C(18,2) = 153
    expected_index = 45 * 13 / 153
    assert m["ari"] == pytest.approx((13 - expected_index) / ((45 + 13) / 2 - expected_index))
    # NMI (arithmetic mean): pure clusters, so MI = H(classes) = log 3
    sizes = np.array([4, 1, 1, 3, 2, 1, 2, 2, 2]) / 18
    h_clusters = -(sizes * np.log(sizes)).sum()
    assert m["nmi"] == pytest.approx(2 * math.log(3) / (math.log(3) + h_clusters))


def test_single_cluster():
    y = np.array([0] * 5 + [1] * 3 + [2] * 2)
    m = clustering_metrics(y, np.zeros(10, dtype=int))
    assert m["nmi"] == pytest.approx(0.0, abs=1e-12)
    assert m["ari"] == pytest.approx(0.0, abs=1e-12)
    assert m["ami"] == pytest.approx(0.0, abs=1e-12)
    assert m["acc"] == pytest.approx(0.5)  # the largest class


def brute_force_acc(y, pred):
    classes, clusters = sorted(set(y)), sorted(set(pred))
    best = 0
    if len(clusters) >= len(classes):
        for chosen in itertools.permutations(clusters, len(classes)):
            best = max(best, sum(np.sum((y == c) & (pred == k)) for c, k in zip(classes, chosen)))
    else:
        for chosen in itertools.permutations(classes, len(clusters)):
            best = max(best, sum(np.sum((y == c) & (pred == k)) for c, k in zip(chosen, clusters)))
    return best / len(y)


@pytest.mark.parametrize("num_clusters", [2, 4, 6])
def test_hungarian_accuracy_matches_brute_force(num_clusters):
    rng = np.random.default_rng(num_clusters)
    for _ in range(5):
        y = rng.integers(0, 4, size=40)
        pred = rng.integers(0, num_clusters, size=40)
        assert hungarian_accuracy(y, pred) == pytest.approx(brute_force_acc(y, pred))


def test_percent_metrics_keep_negative_values_and_clip_float_noise():
    out = as_percent_metrics({"nmi": 1.0000000001, "ami": -0.01, "ari": 0.25, "acc": 0.5})
    assert out == {"NMI": 100.0, "AMI": -1.0, "ARI": 25.0, "ACC": 50.0}


def blobs(n_per_class: int, num_classes: int, dim: int, seed: int, noise: float = 0.05):
    """Points around orthogonal directions (well separated in angle, as cosine k-means needs)."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:num_classes] * 5
    labels = np.repeat(np.arange(num_classes), n_per_class)
    return (centres[labels] + noise * rng.normal(size=(len(labels), dim))).astype(np.float32), labels


def test_kmeans_on_separated_blobs_recovers_the_classes():
    x, y = blobs(60, 6, 16, seed=0)
    assignment, params = kmeans_assign(torch.from_numpy(x), 6, seed=0, niter=30, nredo=3)
    m = clustering_metrics(y, assignment)
    assert m["nmi"] > 0.99 and m["acc"] > 0.99
    assert params["max_points_per_centroid"] * 6 >= len(x)  # FAISS did not subsample
    again, _ = kmeans_assign(torch.from_numpy(x), 6, seed=0, niter=30, nredo=3)
    np.testing.assert_array_equal(assignment, again)


# ----------------------------------------------------------------------------- linear probe


def test_linear_probe_separable_features_high_accuracy():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(32, 5))
    x = rng.normal(size=(3000, 32)).astype(np.float32)
    logits = np.sort(x @ w, axis=1)
    x = x[logits[:, -1] - logits[:, -2] > 0.5][:1200]  # a margin: linearly separable with room to spare
    y = (x @ w).argmax(axis=1)
    budget = {"epochs": 60, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}
    metrics, params, _ = linear_probe(Labelled(torch.from_numpy(x[:1000]), torch.from_numpy(y[:1000])),
                                      Labelled(torch.from_numpy(x[1000:]), torch.from_numpy(y[1000:])), 5, budget,
                                      seed=0)
    assert metrics["top1"] > 97.0
    assert params["epochs"] == 60 and params["lr"] == 0.1


def test_linear_probe_random_labels_is_at_chance():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(3000, 16)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 10, size=3000))
    budget = {"epochs": 20, "batch_size": 256, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}
    metrics, _, _ = linear_probe(Labelled(x[:1000], y[:1000]), Labelled(x[1000:], y[1000:]), 10, budget, seed=0)
    assert abs(metrics["top1"] - 10.0) < 3.0  # 2000 test points: std of chance accuracy ~0.7%
    assert abs(metrics["top5"] - 50.0) < 5.0


def test_linear_probe_is_deterministic_given_the_seed():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(size=(300, 8)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 3, size=300))
    kw = dict(epochs=5, batch_size=32, lr=0.1, momentum=0.9, weight_decay=1e-4)
    a = predict(fit_linear_classifier(x, y, 3, kw, seed=7), x)
    b = predict(fit_linear_classifier(x, y, 3, kw, seed=7), x)
    c = predict(fit_linear_classifier(x, y, 3, kw, seed=8), x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the seed sets the mini-batch order


# ----------------------------------------------------------------------------- semi-supervised subsets


def test_semi_subsets_are_class_balanced_nested_and_seeded():
    labels = torch.from_numpy(np.random.default_rng(0).integers(0, 10, size=2000))
    per_class_1pct = semi.images_per_class(2000, 10, 0.01)
    small = semi.draw_balanced_subset(labels, 10, per_class_1pct, seed=3)
    large = semi.draw_balanced_subset(labels, 10, semi.images_per_class(2000, 10, 0.1), seed=3)
    assert np.bincount(labels.numpy()[small], minlength=10).tolist() == [2] * 10
    assert np.bincount(labels.numpy()[large], minlength=10).tolist() == [20] * 10
    assert set(small) <= set(large)
    np.testing.assert_array_equal(small, semi.draw_balanced_subset(labels, 10, 2, seed=3))
    assert not np.array_equal(large, semi.draw_balanced_subset(labels, 10, 20, seed=4))


def test_semi_subsets_by_count_are_class_balanced_and_identical_for_every_method(tmp_path):
    data = FakeData()
    cfg = {**EVAL, "per_layer": False, "protocols": ["semi"],
           "semi": {"fractions": [], "per_class": [2, 5], "subsets": [7, 8], "mode": "linear"}}
    runs = [evaluate_model(TinyMethod(with_head=head), data, preprocess, cfg,
                           EvalContext(seed=seed, results_dir=tmp_path, progress=False, suite="synthetic"))
            for head, seed in ((False, 0), (True, 1))]
    labels = data.train.labels.numpy()
    for key, count in (("semi_2perclass", 2), ("semi_5perclass", 5)):
        first, second = (r.evaluation[key]["subsets"] for r in runs)
        assert [s["subset_seed"] for s in first] == [7, 8]  # the subset seeds, not the pretraining seed
        assert first == [{**s, "metrics": f["metrics"]} for s, f in zip(second, first)]  # same files, same images
        for subset in first:
            indices = json.loads(Path(subset["split_file"]).read_text())["indices"]
            assert np.bincount(labels[indices], minlength=4).tolist() == [count] * 4
        # the metric of a run is the mean over its subsets; predictions are kept per subset
        mean = np.mean([s["metrics"]["top1"] for s in first])
        assert runs[0].table()[key]["top1"] == pytest.approx(mean)
        assert runs[0].predictions[key].shape == (2, len(data.test.labels), 5)
    with pytest.raises(ConfigError, match="evaluation.semi.per_class: 99 images per class, but the smallest class"):
        evaluate_model(TinyMethod(with_head=False), data, preprocess,
                       {**cfg, "semi": {**cfg["semi"], "per_class": [99]}}, EvalContext(progress=False, suite="synthetic"))


def test_semi_fraction_below_one_image_per_class_is_refused():
    with pytest.raises(ConfigError, match="evaluation.semi.fractions"):
        semi.images_per_class(100, 10, 0.05)


def test_semi_subset_is_stored_once_and_reused(tmp_path, monkeypatch):
    labels = torch.arange(500) % 10
    first, path = semi.subset_indices(labels, 10, 5, 0, "mysuite", tmp_path)
    assert path == tmp_path / "splits" / "mysuite" / "semi_5pc_subset0.json"
    stored = json.loads(path.read_text())
    assert stored["indices"] == first.tolist() and stored["per_class"] == 5

    def must_not_draw(*args, **kwargs):
        raise AssertionError("the stored subset must be reused, not redrawn")

    monkeypatch.setattr(semi, "draw_balanced_subset", must_not_draw)
    second, path2 = semi.subset_indices(labels, 10, 5, 0, "mysuite", tmp_path)
    assert path2 == path and np.array_equal(first, second)
    # a stored split that does not fit the train split is refused, not silently used
    with pytest.raises(ConfigError, match="delete it to redraw"):
        semi.subset_indices(torch.arange(400) % 10, 10, 5, 0, "mysuite", tmp_path)


def test_percent_labels_and_keys():
    assert semi.metric_key(0.01) == "semi_1pct" and semi.metric_key(0.1) == "semi_10pct"
    assert semi.percent_label(0.005) == "0.5"


# ----------------------------------------------------------------------------- config schema


def test_resolve_evaluation_refuses_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="evaluation.linear.epoch"):
        resolve_evaluation({"linear": {"epoch": 3}})
    with pytest.raises(ConfigError, match="evaluation.semi.mode"):
        resolve_evaluation({"semi": {"mode": "full"}})
    with pytest.raises(ConfigError, match="evaluation.semi.fractions"):
        resolve_evaluation({"semi": {"fractions": [0.0]}})
    with pytest.raises(ConfigError, match="evaluation.transfer.targets"):
        resolve_evaluation({"transfer": {"targets": ["imagenet-21k"]}})
    with pytest.raises(ConfigError, match="evaluation.protocols"):
        resolve_evaluation({"protocols": ["knn", "probe"]})
    cfg = resolve_evaluation({"linear": {"lr": 1}})
    assert cfg.linear.lr == 1.0 and cfg.semi == EvaluationConfig().semi


# ----------------------------------------------------------------------------- transfer preprocessing


def test_transfer_preprocess_adapts_channels_size_and_normalises():
    grey = torch.full((2, 1, 4, 4), 51, dtype=torch.uint8)  # 0.2
    out = transfer_preprocess(8, 3, [0.1, 0.2, 0.3], [0.5, 0.5, 0.5])(grey)
    assert out.shape == (2, 3, 8, 8)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.2, 0.0, -0.2]))
    rgb = torch.tensor([1.0, 0.5, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    torch.testing.assert_close(adapt_channels(rgb, 1), torch.full((1, 1, 2, 2), 0.299 + 0.5 * 0.587))


# ----------------------------------------------------------------------------- evaluate_model end to end


def synthetic_images(n_per_class: int, num_classes: int, seed: int) -> ImageDataset:
    """8x8 grey images: class c lights up row c (plus noise) -- easy for any probe."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), n_per_class)
    images = rng.integers(0, 60, size=(len(labels), 1, 8, 8))
    images[np.arange(len(labels)), 0, labels, :] += 180
    return ImageDataset("synthetic", "train" if seed == 0 else "test", torch.from_numpy(labels),
                        [str(c) for c in range(num_classes)], images=torch.from_numpy(images.astype(np.uint8)))


class FakeData:
    def __init__(self, num_classes=4):
        self.train = synthetic_images(30, num_classes, 0)
        self.test = synthetic_images(10, num_classes, 1)
        self.pretrain = self.train
        self.num_classes = num_classes
        self.display_name = "synthetic"


class TinyMethod(nn.Module):
    """A stand-in for an SSLMethod: a backbone, optionally a cluster head with 3x over-clustering."""

    def __init__(self, with_head: bool, num_classes: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = small_cnn(in_channels=1, width=8)
        self.head = nn.Linear(self.backbone.feature_dim, 3 * num_classes) if with_head else None

    def cluster_logits(self, images):
        return None if self.head is None else self.head(self.backbone(images))


def preprocess(images):
    return images.float() / 255.0


EVAL = {"knn": {"ks": [5, 20]}, "linear": {"epochs": 20, "batch_size": 32},
        "semi": {"fractions": [0.1, 0.5], "mode": "linear"}, "clustering": {"niter": 20, "nredo": 2},
        "per_layer": True}


def test_evaluate_model_all_protocols(tmp_path):
    data = FakeData()
    result = evaluate_model(TinyMethod(with_head=False), data, preprocess, EVAL,
                            EvalContext(seed=0, results_dir=tmp_path, progress=False, suite="synthetic"))
    m = result.table()
    expected = {"knn_k5", "knn_k20", "linear", "semi_10pct", "semi_50pct", "clustering"}
    expected |= {f"knn_k20_B{i}" for i in (1, 2, 3)} | {f"linear_B{i}" for i in (1, 2, 3)}
    assert set(m) == expected
    assert set(m["clustering"]) == {"NMI", "AMI", "ARI", "ACC"}
    for key in expected - {"clustering"}:
        assert set(m[key]) == {"top1", "top5"}
        assert set(result.evaluation[key]) >= ({"k"} if key.startswith("knn") else {"epochs", "lr"})
        assert "settings" in result.evaluation[key] and "protocol" in result.evaluation[key]
    # the last stage is the backbone's output: the same kNN result
    assert m["knn_k20_B3"] == m["knn_k20"]
    assert result.clusters["clustering"]["source"] == "kmeans" and result.clusters["clustering"]["num_clusters"] == 4
    assert 1 <= result.clusters["clustering"]["num_nonempty"] <= 4
    assert result.evaluation["semi_10pct"]["num_images"] == 12  # 3 per class
    assert (tmp_path / "splits" / "synthetic" / "semi_3pc_subset0.json").exists()
    # per-image predictions of every protocol, consistent with the metrics
    p = result.predictions
    assert set(p) == expected | {"labels"}
    labels = torch.as_tensor(p["labels"])
    for key in expected - {"clustering"}:
        top = torch.as_tensor(p[key]).long()
        assert top.shape == (len(labels), 5)
        assert 100 * (top[:, 0] == labels).float().mean().item() == pytest.approx(m[key]["top1"])
        assert 100 * (top == labels[:, None]).any(dim=1).float().mean().item() == pytest.approx(m[key]["top5"])
    assert 100 * clustering_metrics(labels, p["clustering"])["nmi"] == pytest.approx(m["clustering"]["NMI"])


def test_nan_features_stop_the_evaluation_naming_method_protocol_and_rows(tmp_path):
    class Broken(TinyMethod):
        name = "broken_method"

        def __init__(self):
            super().__init__(with_head=False)
            self.backbone.register_forward_hook(lambda module, inputs, out: out.index_fill(
                0, torch.tensor([0, 1, 2]), float("nan")))

    with pytest.raises(NonFiniteFeaturesError, match=r"method 'broken_method', protocol knn: \d+ of 120 train "
                                                      r"feature rows are not finite"):
        evaluate_model(Broken(), FakeData(), preprocess, {**EVAL, "protocols": ["knn"]},
                       EvalContext(progress=False, suite="s"))


def test_the_head_is_scored_apart_and_the_headline_does_not_depend_on_it(tmp_path):
    data = FakeData()
    cfg = {**EVAL, "per_layer": False, "protocols": ["clustering", "semi"]}
    context = EvalContext(seed=1, results_dir=tmp_path, progress=False, suite="synthetic")
    a = evaluate_model(TinyMethod(with_head=False), data, preprocess, cfg, context)
    split_file = tmp_path / "splits" / "synthetic" / "semi_15pc_subset0.json"
    written = split_file.read_text()
    method = TinyMethod(with_head=True)  # a 3x over-clustering head: K = 12 for 4 classes
    b = evaluate_model(method, data, preprocess, cfg, context)
    assert split_file.read_text() == written
    assert a.evaluation["semi_50pct"]["subsets"] == b.evaluation["semi_50pct"]["subsets"]
    assert b.evaluation["semi_50pct"]["subsets"][0]["split_file"] == str(split_file)
    # the headline (k-means, K = classes) is the same whatever head the method has
    assert b.table()["clustering"] == a.table()["clustering"]
    assert b.clusters["clustering"] == a.clusters["clustering"]
    # the head: its own key, K = 12, many-to-one ACC and no one-to-one ACC
    assert b.clusters["clustering_head_k12"]["source"] == "head" and b.clusters["clustering_head_k12"]["num_clusters"] == 12
    assert set(b.table()["clustering_head_k12"]) == {"NMI", "AMI", "ARI", "ACC_MANY_TO_ONE"}
    with torch.no_grad():
        method.eval()
        expected = method.cluster_logits(preprocess(data.test.images)).argmax(1)
    raw = clustering_metrics(data.test.labels, expected)
    assert b.table()["clustering_head_k12"]["NMI"] == pytest.approx(100 * raw["nmi"])
    assert b.clusters["clustering_head_k12"]["num_nonempty"] == len(set(expected.tolist()))


def test_finetune_learns_and_leaves_the_backbone_untouched():
    data = FakeData()
    torch.manual_seed(0)
    backbone = small_cnn(in_channels=1, width=8)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    views = semi.finetune_views("clean", None, preprocess)
    budget = dict(epochs=15, batch_size=32, lr=0.05, momentum=0.9, weight_decay=0.0)
    model = semi.finetune(backbone, data.train, 4, views, budget, seed=0)
    assert semi.evaluate_classifier(model, data.test, preprocess)["top1"] > 90.0
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    again = semi.finetune(backbone, data.train, 4, views, budget, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), again.state_dict().values()))


def test_knn_k10_scores_each_blocks_pooled_maps_with_the_plurality_vote():
    """knn_k10 reads the pooled block features of the cached pass over every stage: the same as pooling each
    block's maps by hand and voting with knn_plurality_predict."""
    from benchmarks.evaluation.knn import knn_plurality_predict

    data, method = FakeData(), TinyMethod(with_head=False)
    cfg = {**EVAL, "per_layer": False, "protocols": ["knn_k10"], "knn_k10": {"k": 5, "blocks": [1, 2]}}
    result = evaluate_model(method, data, preprocess, cfg, EvalContext(seed=0, progress=False, suite="synthetic"))
    method.backbone.eval()
    with torch.no_grad():
        maps = {split: method.backbone.forward_stages(preprocess(getattr(data, split).images))
                for split in ("train", "test")}
    expected = []
    for block in (1, 2):
        train, test = (maps[s][block - 1].mean(dim=(2, 3)) for s in ("train", "test"))
        predicted = knn_plurality_predict(train, data.train.labels, test, data.num_classes, k=5)
        expected.append(100.0 * (predicted == data.test.labels).float().mean().item())
        assert result.table()[f"knn_k5_B{block}"]["top1"] == pytest.approx(expected[-1])
    assert result.table()["knn_k5_avg"]["top1"] == pytest.approx(sum(expected) / 2)


class TwoHeadMethod(TinyMethod):
    """Two cluster heads with the same K: the second is told apart by its head number."""

    def __init__(self):
        super().__init__(with_head=True)
        self.head2 = nn.Linear(self.backbone.feature_dim, 12)

    def cluster_logits(self, images):
        features = self.backbone(images)
        return [self.head(features), self.head2(features)]


def test_entries_are_exactly_the_schema2_conversion_of_the_same_evaluation(tmp_path):
    """The entries an evaluation produces (protocol, settings with block / head / dataset, metric, value, key)
    equal what records.metric_entries gives for the schema-2 form ({key: {metric: value}} + evaluation) of the
    same evaluation: the same settings dicts, in the same order, for every kind of place."""
    from benchmarks.config import load_suite
    from benchmarks.records import metric_entries

    cfg = {**EVAL, "protocols": ["knn", "linear", "clustering", "semi", "transfer", "knn_k10", "block_classifier"],
           "knn_k10": {"k": 5, "blocks": [1, 2]},
           "block_classifier": {"blocks": [1, 2], "epochs": 1, "batch_size": 64, "milestones": [1]},
           "transfer": {"targets": ["digits"], "epochs": 1, "batch_size": 256}}
    context = EvalContext(seed=0, config=load_suite("digits"), results_dir=tmp_path, progress=False,
                          suite="synthetic")
    result = evaluate_model(TwoHeadMethod(), FakeData(), preprocess, cfg, context)
    schema2 = result.table()  # the {key: {metric: value}} form, in the order the evaluation made it
    assert json.dumps(metric_entries(schema2, result.evaluation)) == json.dumps(result.entries)
    places = {e["key"]: {k: e["settings"][k] for k in ("block", "head", "dataset") if k in e["settings"]}
              for e in result.entries}
    assert places["knn_k20_B2"] == {"block": 2} and places["linear_B3"] == {"block": 3}
    assert places["knn_k5_B1"] == {"block": 1} and places["knn_k5_avg"] == {"block": "avg"}
    assert places["block_classifier_B2"] == {"block": 2} and places["block_classifier_avg"] == {"block": "avg"}
    assert places["clustering_head_k12"] == {} and places["clustering_head_k12_h2"] == {"head": 2}
    assert places["transfer_linear:digits"] == {"dataset": "digits"}
    assert places["knn_k5"] == places["clustering"] == places["semi_10pct"] == {}
