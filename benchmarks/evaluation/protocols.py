"""Runs the suite's evaluation protocols on a trained model -> metrics, parameters and per-image predictions.

Every method goes through exactly this code with the settings of the suite's `evaluation` section
(benchmarks.evaluation.settings), which are stored beside the metrics in the record
(`EvalResult.evaluation[key]`, with the protocol's `settings`: what a table column must agree on).

Protocols (metric keys as in benchmarks.records):
    knn             knn_k<k> top1/top5 for each k in knn.ks (bank: clean pass over the train split)
    linear          linear top1/top5: offline probe on the frozen backbone (views none | crop_flip)
    online_linear   online_linear top1/top5: the probe trained beside pretraining (benchmarks.training),
                    scored here on the clean test images
    semi            semi_<p>pct / semi_<n>perclass top1/top5: fine-tune (or linear probe) on stored
                    class-balanced subsets of the train split, the mean over the subsets of semi.subsets
    finetune        finetune_100pct top1/top5: fine-tune on the whole labelled train split
    clustering      clustering NMI/AMI/ARI/ACC: FAISS k-means with K = classes on l2-normalised backbone
                    features, for every method (the headline); plus clustering_head_k<K> for each head a
                    method has (NMI/AMI/ARI, and ACC at K = classes or ACC_M2O, many-to-one, otherwise)
    transfer        transfer_linear:<Dataset> top1/top5: linear probe on each target dataset
    knn_k10         knn_k10_B<i>, knn_k10_avg top1: SSL++ Table V, plurality-vote kNN per block
    block_classifier block_classifier_B<i>, block_classifier_avg top1/top5: SSL++ Table III
    per_layer       (flag) knn_k20_B<i> / linear_B<i> on every backbone stage, with knn / linear

Predictions (`EvalResult.predictions`, stored beside the record): the ranked top-5 classes of every
test image for each classification key (int16, -1 = no prediction), the cluster of every test image
for each clustering key, and the test labels; later statistics need no re-evaluation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from benchmarks.errors import ConfigError
from benchmarks.evaluation import clustering as clustering_mod
from benchmarks.evaluation import semi as semi_mod
from benchmarks.evaluation import transfer as transfer_mod
from benchmarks.evaluation.block_classifier import block_classifier_predict, train_block_classifier
from benchmarks.evaluation.features import backbone_features, check_finite, eval_mode, extract
from benchmarks.evaluation.knn import (
    faiss_info,
    knn_classify,
    knn_plurality_predict,
    topk_accuracy,
    topk_predictions,
)
from benchmarks.evaluation.linear import Labelled, budget_params, linear_probe, linear_probe_on_views
from benchmarks.evaluation.settings import PROTOCOLS, EvaluationConfig, KnnSettings
from benchmarks.records import entry_table, evaluation_entries
from ssl_common.typed import validate

if TYPE_CHECKING:
    from benchmarks.config import SuiteConfig

log = logging.getLogger("benchmarks")

# cheap first; online_linear only scores the probe trained during pretraining
RUN_ORDER = ("knn", "online_linear", "linear", "clustering", "knn_k10", "semi", "finetune", "transfer",
             "block_classifier")
PER_LAYER_KNN_K = 20
TOP_K = 5  # predictions keep the ranked top-5 classes of every test image


@dataclass(frozen=True)
class EvalContext:
    """What an evaluation needs besides the model, the data and the settings, given once: the device, the run's
    seed, the suite config (its name, views and normalisation for fine-tuning and transfer), where transfer
    targets are read (`data_root`, default $SSL_BENCH_DATA or ./data) and labelled subsets stored
    (`results_dir`/splits; not stored when None), and whether progress bars show."""

    device: torch.device | str = "cpu"
    seed: int = 0
    config: SuiteConfig | None = None
    suite: str | None = None  # the name stored subsets go under (default: the config's, else the data's)
    data_root: str | Path | None = None
    results_dir: str | Path | None = None
    progress: bool = True


@dataclass
class EvalResult:
    """An evaluation's output: its metric entries (schema 3, benchmarks.records.MetricEntry: protocol, settings
    with the entry's block / head / dataset, metric, value, key) and, per evaluation key, the details a record
    stores beside them."""

    entries: list = field(default_factory=list)  # {protocol, settings, metric, value, key}, in evaluation order
    evaluation: dict = field(default_factory=dict)  # key -> parameters used (+ protocol, settings)
    clusters: dict = field(default_factory=dict)  # clustering key -> K, non-empty clusters, source
    predictions: dict = field(default_factory=dict)  # array name -> per-test-image predictions

    def table(self) -> dict[str, dict[str, float]]:
        """{key: {metric: value}}, for display (the evaluate command's lines, trackers) and tests only."""
        return entry_table({"metrics": self.entries})


def resolve_evaluation(section: EvaluationConfig | dict | None) -> EvaluationConfig:
    """The `evaluation` section as its typed model (a mapping is validated; errors name evaluation.<key>)."""
    return validate(EvaluationConfig, section, "evaluation")


def top_predictions(scores: torch.Tensor, exclude_zero: bool) -> np.ndarray:
    """The stored form of a classifier's output: ranked top-5 classes, int16 [n, 5], -1 = none."""
    return topk_predictions(scores, TOP_K, exclude_zero=exclude_zero).numpy().astype(np.int16)


def images_per_class_min(labels: torch.Tensor, num_classes: int) -> int:
    return int(torch.bincount(torch.as_tensor(labels).long(), minlength=num_classes).min())


def protocol_family(protocol: str) -> str:
    """The protocol that runs an entry or evaluation of `protocol` (a method's own heads run with clustering)."""
    return {"clustering_head": "clustering"}.get(protocol, protocol)


def run_knn(train: Labelled, test: Labelled, num_classes: int, cfg: KnnSettings, ks=None):
    """(k, metrics, parameters, predictions) of the weighted kNN for each k (default cfg.ks); the settings
    were checked against the bank's size before any work (benchmarks.runner.check_evaluation_fits)."""
    per_class = images_per_class_min(train.labels, num_classes)
    for k in ks or cfg.ks:
        scores = knn_classify(train.features, train.labels, test.features, num_classes, k, cfg.temperature)
        params = {"protocol": "knn", "settings": {"k": k, "temperature": cfg.temperature},
                  "k": k, "temperature": cfg.temperature, "bank": "train split, clean views",
                  "bank_size": len(train.features), "bank_images_per_class_min": per_class,
                  "similarity": "cosine (l2-normalised)", "vote": "exp(sim / temperature)",
                  "top_k_rule": "votes descending, then class index; classes without a vote never count",
                  "faiss": faiss_info()}
        yield k, topk_accuracy(scores, test.labels), params, top_predictions(scores, exclude_zero=True)


class _Evaluation:
    """One model's evaluation: caches the features every protocol shares, collects the entries."""

    def __init__(self, method, data, preprocess, cfg: EvaluationConfig, context: EvalContext, online_probe=None):
        self.method, self.data, self.preprocess, self.cfg = method, data, preprocess, cfg
        self.context, self.online_probe = context, online_probe
        self.device, self.seed, self.config = torch.device(context.device), context.seed, context.config
        self.suite = context.suite or (self.config.name if self.config is not None else data.train.name)
        self.backbone = method.backbone
        self.name = getattr(method, "name", type(method).__name__)
        self.bs = cfg.batch_size
        self.result = EvalResult()
        self.result.predictions["labels"] = torch.as_tensor(data.test.labels).numpy().astype(np.int64)
        self._features: dict[tuple[str, str], torch.Tensor] = {}
        self._stage_features: dict[str, list[torch.Tensor]] = {}

    def desc(self, text: str) -> str | None:
        return text if self.context.progress else None

    def features(self, split: str, protocol: str, kind: str = "backbone") -> torch.Tensor:
        """Clean features of a split, extracted once: the backbone's, or (`probe`) what the method's paper
        probes (SSLMethod.probe_features, e.g. UIC's MLP head; the backbone's by default)."""
        fn = self.probe_fn() if kind == "probe" else self.backbone
        key = (split, "backbone" if fn is self.backbone else kind)
        if key not in self._features:
            with eval_mode(self.method):
                self._features[key] = extract(fn, getattr(self.data, split), self.preprocess, self.device, self.bs,
                                              desc=self.desc(f"features ({split})"))
        return check_finite(self._features[key], method=self.name, protocol=protocol, split=split)

    def labelled(self, split: str, protocol: str, kind: str = "backbone") -> Labelled:
        return Labelled(self.features(split, protocol, kind), getattr(self.data, split).labels)

    def probe_fn(self):
        """What the linear probe reads: the method's own probe_features where it overrides SSLMethod's (its
        paper probes something else, e.g. UIC's MLP head), else the backbone."""
        from methods.base import SSLMethod

        override = getattr(type(self.method), "probe_features", None)
        if override is not None and override is not getattr(SSLMethod, "probe_features", None):
            return self.method.probe_features
        return self.backbone

    def stage_features(self, split: str, protocol: str) -> list[torch.Tensor]:
        if split not in self._stage_features:
            backbone = self.backbone
            if not hasattr(backbone, "pooled_stages"):
                raise ConfigError("evaluation.per_layer: this backbone has no pooled_stages(); set per_layer: false")
            with eval_mode(backbone):
                self._stage_features[split] = extract(backbone.pooled_stages, getattr(self.data, split),
                                                      self.preprocess, self.device, self.bs,
                                                      desc=self.desc(f"stage features ({split})"))
        return check_finite(self._stage_features[split], method=self.name, protocol=protocol, split=split)

    def _check_block(self, block: int, protocol: str, needs: str) -> None:
        if not hasattr(self.backbone, needs):
            raise ConfigError(f"evaluation.{protocol}: this backbone has no {needs}(); remove {protocol}")
        stages = len(getattr(self.backbone, "stage_dims", [])) or None
        if stages is not None and block > stages:
            raise ConfigError(f"evaluation.{protocol}.blocks: block {block} does not exist; the backbone has "
                              f"{stages} blocks; use blocks 1 to {stages}, e.g. --set "
                              f"'evaluation.{protocol}.blocks=[{', '.join(map(str, range(2, stages + 1)))}]'")

    def block_pooled(self, split: str, block: int, protocol: str) -> torch.Tensor:
        """Average-pooled features [N, C] of block `block`: from the cached pass over every stage (one forward
        pass per split for all blocks, not one per block)."""
        self._check_block(block, protocol, "pooled_stages")
        return self.stage_features(split, protocol)[block - 1]

    def block_maps(self, split: str, block: int, protocol: str) -> torch.Tensor:
        """Feature maps [N, C, H, W] of backbone block `block` (1 = the first), one block at a time (all
        blocks of a CIFAR train split together would need several GB)."""
        self._check_block(block, protocol, "forward_stages")
        backbone = self.backbone
        with eval_mode(backbone):
            maps = extract(lambda x: backbone.forward_stages(x)[block - 1], getattr(self.data, split), self.preprocess,
                           self.device, self.bs, desc=self.desc(f"block {block} maps ({split})"))
        return check_finite(maps, method=self.name, protocol=protocol, split=split)

    def add(self, key: str, metrics: dict, details: dict, predictions: dict | None = None, **place) -> None:
        """Record one evaluation: an entry per metric (its protocol and settings from `details`, plus its
        `place`: block, head or dataset), the details under `key`, and its predictions."""
        self.result.entries += evaluation_entries(key, metrics, details, **place)
        self.result.evaluation[key] = details
        self.result.predictions.update(predictions or {})

    # -- protocols -------------------------------------------------------------------------
    def knn(self) -> None:
        d = self.data
        for k, metrics, params, predicted in run_knn(self.labelled("train", "knn"), self.labelled("test", "knn"),
                                                     d.num_classes, self.cfg.knn):
            self.add(f"knn_k{k}", metrics, params, {f"knn_k{k}": predicted})
        if self.cfg.per_layer:
            train, test = self.stage_features("train", "knn"), self.stage_features("test", "knn")
            for i, (tr, te) in enumerate(zip(train, test), start=1):
                for k, metrics, params, predicted in run_knn(Labelled(tr, d.train.labels), Labelled(te, d.test.labels),
                                                             d.num_classes, self.cfg.knn, ks=[PER_LAYER_KNN_K]):
                    self.add(f"knn_k{k}_B{i}", metrics, params, {f"knn_k{k}_B{i}": predicted}, block=i)

    def _linear(self, key: str, train: Labelled, test: Labelled, extra: dict, block: int | None = None) -> None:
        cfg = self.cfg.linear
        metrics, params, scores = linear_probe(train, test, self.data.num_classes, cfg, seed=self.seed,
                                               device=self.device, desc=self.desc(f"{key} probe"))
        self.add(key, metrics, {**params, **extra, "protocol": "linear", "settings": cfg.model_dump(mode="json")},
                 {key: top_predictions(scores, exclude_zero=False)}, block=block)

    def _linear_on_views(self) -> None:
        """The linear probe on random-resized crops + flips of the train images (linear.views crop_flip)."""
        d, cfg, probe_fn = self.data, self.cfg.linear, self.probe_fn()
        views = semi_mod.finetune_views("crop_flip", self.config, self.preprocess)
        with eval_mode(self.method):
            head, params = linear_probe_on_views(
                lambda images, generator: probe_fn(views(images, generator)), d.train,
                self.features("train", "linear", "probe"), d.num_classes, cfg, seed=self.seed, device=self.device,
                desc=self.desc("linear probe (crop_flip)"))
            scores = extract(lambda x: head(probe_fn(x).float()), d.test, self.preprocess, self.device, self.bs)
        metrics = topk_accuracy(scores, d.test.labels, exclude_zero=False)
        self.add("linear", metrics, {**params, "protocol": "linear", "settings": cfg.model_dump(mode="json")},
                 {"linear": top_predictions(scores, exclude_zero=False)})

    def linear(self) -> None:
        if self.cfg.linear.views == "crop_flip":
            self._linear_on_views()
        else:
            self._linear("linear", self.labelled("train", "linear", "probe"), self.labelled("test", "linear", "probe"),
                         {"probed": "backbone" if self.probe_fn() is self.backbone else "method.probe_features"})
        if self.cfg.per_layer:
            d = self.data
            train, test = self.stage_features("train", "linear"), self.stage_features("test", "linear")
            for i, (tr, te) in enumerate(zip(train, test), start=1):
                self._linear(f"linear_B{i}", Labelled(tr, d.train.labels), Labelled(te, d.test.labels), {"stage": i},
                             block=i)

    @torch.no_grad()
    def online_linear(self) -> None:
        if self.online_probe is None:
            log.info("evaluation: online_linear skipped for %s (no probe was trained: reference row or 0 epochs)",
                     self.name)
            return
        probe = self.online_probe.to(self.device).eval()
        scores = probe(self.features("test", "online_linear").to(self.device)).float().cpu()
        key = "online_linear"
        self.add(key, topk_accuracy(scores, self.data.test.labels, exclude_zero=False),
                 {"protocol": "online_linear", "settings": self.cfg.online_linear.model_dump(mode="json"),
                  "trained": "beside pretraining on stop-gradient backbone features of the first augmented "
                             "view (labels of the pretraining split), SGD momentum 0.9, the pretraining LR "
                             "schedule", "scored_on": "clean test images"},
                 {key: top_predictions(scores, exclude_zero=False)})

    @torch.no_grad()
    def clustering(self) -> None:
        d, method, c = self.data, self.method, self.cfg.clustering
        # the headline, identical for every method: k-means with K = classes on the backbone features
        predicted, params = clustering_mod.kmeans_assign(self.features("test", "clustering"), d.num_classes,
                                                         self.seed, c.niter, c.nredo, c.spherical)
        self._add_clusters("clustering", predicted, params["k"], "kmeans",
                           {**params, "settings": {**c.model_dump(mode="json"), "k": "num_classes"}})
        # the method's own heads (Self-Classifier, CARL, CARP, UIC, IIC, SSL++, SwAV, supervised)
        with eval_mode(method):
            first = d.test.get_batch(torch.arange(min(2, len(d.test)))).to(self.device)
            if method.cluster_logits(self.preprocess(first)) is None:
                return
            heads = extract(lambda x: list(_as_heads(method.cluster_logits(x))), d.test, self.preprocess,
                            self.device, self.bs, desc=self.desc("cluster heads"))
        seen: dict[int, int] = {}
        for index, logits in enumerate(heads):
            k = int(logits.shape[1])
            seen[k] = seen.get(k, 0) + 1
            # a second (third, ...) head with the same K: its place is its head number
            head = None if seen[k] == 1 else index + 1
            key = f"clustering_head_k{k}" + ("" if head is None else f"_h{head}")
            check_finite(logits, method=self.name, protocol="clustering (head)", split="test")
            self._add_clusters(key, logits.argmax(dim=1).numpy(), k, "head",
                               {"assignment": "argmax of the head's logits (clean views)", "head_index": index,
                                "settings": {"source": "head", "k": k}}, head=head)

    def _add_clusters(self, key: str, predicted: np.ndarray, k: int, source: str, params: dict,
                      head: int | None = None) -> None:
        d = self.data
        raw = clustering_mod.clustering_metrics_for_head(d.test.labels, predicted, d.num_classes, k)
        acc = "one_to_one" if k == d.num_classes else "many_to_one"
        matching = ("Hungarian, one cluster per class" if acc == "one_to_one"
                    else "many-to-one: each cluster mapped to its majority class")
        self.add(key, clustering_mod.as_percent_metrics(raw),
                 {**params, "protocol": "clustering" if source == "kmeans" else "clustering_head",
                  "source": source, "split": "test", "num_clusters": k, "num_classes": d.num_classes,
                  "raw_fractions": raw, "acc_matching": matching},
                 {key: np.asarray(predicted, dtype=np.int32)}, head=head)
        self.result.clusters[key] = {"num_clusters": k, "num_nonempty": int(len(np.unique(predicted))),
                                     "num_classes": d.num_classes, "source": source, "acc": acc}

    def _finetuned(self, key: str, subset: torch.Tensor | None, cfg, seed: int, views_mode: str):
        """Fine-tune a copy of the backbone + a linear head on `subset` (all of train if None): (metrics, scores)."""
        d = self.data
        views = semi_mod.finetune_views(views_mode, self.config, self.preprocess)
        train = d.train if subset is None else d.train.subset(subset)
        model = semi_mod.finetune(self.backbone, train, d.num_classes, views, cfg, seed=seed, device=self.device,
                                  desc=self.desc(f"{key} fine-tune"))
        scores = extract(model, d.test, self.preprocess, self.device, self.bs)
        del model
        return topk_accuracy(scores, d.test.labels, exclude_zero=False), scores

    def _semi_subset(self, key: str, per_class: int, subset_seed: int):
        """(metrics, scores, the subset's record) of one labelled subset of `per_class` images per class."""
        d, cfg = self.data, self.cfg.semi
        indices, path = semi_mod.subset_indices(d.train.labels, d.num_classes, per_class, subset_seed, self.suite,
                                                self.context.results_dir)
        # the fine-tuning's own randomness (order, views, head) follows the run's seed and the subset
        run_seed = self.seed * 1_000 + subset_seed
        idx = torch.from_numpy(indices)
        if cfg.mode == "linear":
            metrics, _, scores = linear_probe(Labelled(self.features("train", "semi")[idx], d.train.labels[idx]),
                                              self.labelled("test", "semi"), d.num_classes, self.cfg.linear,
                                              seed=run_seed, device=self.device, desc=self.desc(f"{key} linear"))
        else:
            metrics, scores = self._finetuned(key, idx, cfg, run_seed, cfg.views)
        subset = {"subset_seed": subset_seed, "num_images": len(indices),
                  "split_file": str(path) if path is not None else None, "metrics": metrics}
        return metrics, scores, subset

    def _semi_details(self, kind: str, size, per_class: int, subsets: list) -> dict:
        cfg = self.cfg.semi
        settings = cfg.model_dump(mode="json", exclude={"fractions", "per_class"})
        params = {"protocol": "semi", "settings": {**settings, kind: size}, kind: size, "per_class": per_class,
                  "num_images": subsets[0]["num_images"], "subsets": subsets, "mode": cfg.mode,
                  "aggregate": f"mean over the {len(subsets)} labelled subset(s) of semi.subsets"}
        if cfg.mode == "linear":
            params.update(budget_params(self.cfg.linear))
            params["trained"] = "a linear probe (evaluation.linear's budget) on the subset's frozen features"
        else:
            params.update(budget_params(cfg))
            params.update({"views": cfg.views, "optimizer": "sgd (nesterov)", "schedule": "cosine per step",
                           "head": "linear, zero init", "trained": "whole network (copy of the backbone + head)"})
        return params

    def semi(self) -> None:
        d, cfg = self.data, self.cfg.semi
        sizes = [("fraction", f) for f in cfg.fractions] + [("per_class", n) for n in cfg.per_class]
        for kind, size in sizes:
            key = semi_mod.metric_key(size) if kind == "fraction" else semi_mod.count_key(size)
            per_class = (semi_mod.images_per_class(len(d.train), d.num_classes, size) if kind == "fraction"
                         else semi_mod.check_count(d.train.labels, d.num_classes, size))
            runs, predictions, subsets = [], [], []
            for subset_seed in cfg.subsets:
                metrics, scores, subset = self._semi_subset(key, per_class, subset_seed)
                runs.append(metrics)
                predictions.append(top_predictions(scores, exclude_zero=False))
                subsets.append(subset)
            mean = {m: float(np.mean([r[m] for r in runs])) for m in runs[0]}
            self.add(key, mean, self._semi_details(kind, size, per_class, subsets),
                     {key: np.stack(predictions) if len(predictions) > 1 else predictions[0]})

    def finetune(self) -> None:
        cfg = self.cfg.finetune
        key = "finetune_100pct"
        metrics, scores = self._finetuned(key, None, cfg, self.seed, cfg.views)
        self.add(key, metrics, {"protocol": "finetune", "settings": cfg.model_dump(mode="json"),
                                "num_images": len(self.data.train), "optimizer": "sgd (nesterov)",
                                "schedule": "cosine per step", "head": "linear, zero init",
                                "trained": "whole network (copy of the backbone + head)", "seed": self.seed},
                 {key: top_predictions(scores, exclude_zero=False)})

    def transfer(self) -> None:
        if not self.cfg.transfer.targets:
            return
        if self.config is None:
            raise ValueError("transfer needs the suite config (image_size, in_channels, normalization)")
        norm = self.config.augment.normalization
        preprocess = transfer_mod.transfer_preprocess(self.config.image_size, self.config.in_channels,
                                                      norm.mean, norm.std)
        budget = self.cfg.transfer
        for target in budget.targets:
            key = transfer_mod.metric_key(target)
            train, test = transfer_mod.load_target(target, self.context.data_root)
            feats = [check_finite(backbone_features(self.backbone, split, preprocess, self.device, self.bs,
                                                    desc=self.desc(f"features ({target} {split.split})")),
                                  method=self.name, protocol="transfer", split=f"{target} {split.split}")
                     for split in (train, test)]
            metrics, params, scores = linear_probe(Labelled(feats[0], train.labels), Labelled(feats[1], test.labels),
                                                   train.num_classes, budget, seed=self.seed, device=self.device,
                                                   desc=self.desc(f"{key} probe"))
            params.update({"protocol": "transfer", "settings": budget.model_dump(mode="json", exclude={"targets"}),
                           "target": target, "num_classes": train.num_classes, "image_size": self.config.image_size,
                           "in_channels": self.config.in_channels, "normalization": "the suite's",
                           "target_channels": train.image_shape[0]})
            self.add(key, metrics, params,
                     {key: top_predictions(scores, exclude_zero=False),
                      f"{key}:labels": torch.as_tensor(test.labels).numpy().astype(np.int64)}, dataset=target)

    def knn_k10(self) -> None:
        d, cfg = self.data, self.cfg.knn_k10
        top1 = []
        for block in cfg.blocks:
            key = f"knn_k{cfg.k}_B{block}"
            train, test = self.block_pooled("train", block, "knn_k10"), self.block_pooled("test", block, "knn_k10")
            predicted = knn_plurality_predict(train, d.train.labels, test, d.num_classes, k=cfg.k, metric=cfg.metric)
            accuracy = 100.0 * (predicted == torch.as_tensor(d.test.labels)).float().mean().item()
            top1.append(accuracy)
            ranked = np.full((len(predicted), TOP_K), -1, dtype=np.int16)
            ranked[:, 0] = predicted.numpy()
            self.add(key, {"top1": accuracy},
                     {"protocol": "knn_k10", "settings": cfg.model_dump(mode="json", exclude={"blocks"}),
                      "block": block, "k": cfg.k, "metric": cfg.metric, "vote": "plurality (one vote each)",
                      "features": "average-pooled block feature maps, clean views",
                      "tie_rule": "the tied class whose nearest member is closest"},
                     {key: ranked}, block=block)
        self.add(f"knn_k{cfg.k}_avg", {"top1": float(np.mean(top1))},
                 {"protocol": "knn_k10", "settings": cfg.model_dump(mode="json"),
                  "aggregate": f"mean over blocks {cfg.blocks}"}, block="avg")

    def block_classifier(self) -> None:
        d, cfg = self.data, self.cfg.block_classifier
        budget = cfg.model_dump(exclude={"blocks"})
        top1 = []
        for block in cfg.blocks:
            key = f"block_classifier_B{block}"
            train = self.block_maps("train", block, "block_classifier")
            model = train_block_classifier(train, d.train.labels, d.num_classes, budget, seed=self.seed,
                                           device=self.device, desc=self.desc(f"{key} training"))
            del train
            scores = block_classifier_predict(model, self.block_maps("test", block, "block_classifier"), self.device)
            metrics = topk_accuracy(scores, d.test.labels, exclude_zero=False)
            top1.append(metrics["top1"])
            self.add(key, metrics,
                     {"protocol": "block_classifier", "settings": cfg.model_dump(mode="json", exclude={"blocks"}),
                      "block": block, **budget, "optimizer": "sgd", "schedule": "steps at the milestones",
                      "classifier": "NIN block (3x3, 1x1, 1x1 conv-BN-ReLU, 192) + global average pool + linear",
                      "features": "frozen block feature maps, extracted once from clean views"},
                     {key: top_predictions(scores, exclude_zero=False)}, block=block)
        self.add("block_classifier_avg", {"top1": float(np.mean(top1))},
                 {"protocol": "block_classifier", "settings": cfg.model_dump(mode="json"),
                  "aggregate": f"mean over blocks {cfg.blocks}"}, block="avg")


def _as_heads(logits) -> list[torch.Tensor]:
    return list(logits) if isinstance(logits, (list, tuple)) else [logits]


def evaluate_model(method, suite_data, preprocess, eval_cfg: EvaluationConfig | dict | None,
                   context: EvalContext | None = None, protocols=None, online_probe=None) -> EvalResult:
    """Evaluate `method` (its backbone frozen, except for fine-tuning a copy) with the protocols of
    `eval_cfg` (or `protocols`, in RUN_ORDER) -> its entries and their details. `context`: device, seed, paths
    and progress (EvalContext); `online_probe`: the linear head trained beside pretraining (online_linear).
    """
    cfg = resolve_evaluation(eval_cfg)
    chosen = list(protocols or cfg.protocols)
    unknown = [p for p in chosen if p not in PROTOCOLS]
    if unknown:
        raise ConfigError(f"protocols: unknown protocol '{unknown[0]}'; allowed: {', '.join(PROTOCOLS)}")
    run = _Evaluation(method, suite_data, preprocess, cfg, context or EvalContext(), online_probe)
    for name in RUN_ORDER:
        if name in chosen:
            started = time.perf_counter()
            getattr(run, name)()
            log.info("evaluation: %s took %.1f s", name, time.perf_counter() - started)
    return run.result
