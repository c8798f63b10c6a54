"""Runs the suite's evaluation protocols on a trained model -> metrics for the run record.

Every method goes through exactly this code with the parameters from the suite's
`evaluation` section (schema: EVALUATION_DEFAULTS; unknown keys are refused), which are
stored beside the metrics in the record (`EvalResult.evaluation[metric key]`).

Protocols (metric keys as in benchmarks.records):
    knn         knn_k<k> top1/top5 for each k in knn.ks (bank: clean pass over the train split)
    linear      linear top1/top5: linear probe on frozen features extracted once
    semi        semi_<pct>pct top1/top5 for each fraction: fine-tune (or linear probe) on a stored
                class-balanced subset of the train split
    clustering  clustering NMI/AMI/ARI/ACC on the test split: the method's head, else FAISS k-means
    transfer    transfer_linear:<Dataset> top1/top5: linear probe on each target dataset
    per_layer   (flag) knn_k20_B<i> / linear_B<i> on each backbone stage, with knn / linear
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.errors import ConfigError
from benchmarks.evaluation import clustering as clustering_mod
from benchmarks.evaluation import semi as semi_mod
from benchmarks.evaluation import transfer as transfer_mod
from benchmarks.evaluation.features import backbone_features, extract
from benchmarks.evaluation.knn import knn_classify, topk_accuracy
from benchmarks.evaluation.linear import LINEAR_BUDGET_KEYS, linear_probe
from benchmarks.evaluation.settings import PROTOCOLS, EvaluationConfig, KnnSettings
from ssl_common.typed import validate

log = logging.getLogger("benchmarks")

RUN_ORDER = ("knn", "linear", "clustering", "semi", "transfer")  # cheap first
PER_LAYER_KNN_K = 20

@dataclass
class EvalResult:
    metrics: dict = field(default_factory=dict)  # protocol -> metric -> percent
    evaluation: dict = field(default_factory=dict)  # protocol -> parameters used
    clusters: dict | None = None


def resolve_evaluation(section: EvaluationConfig | dict | None) -> EvaluationConfig:
    """The `evaluation` section as its typed model (a mapping is validated; errors name evaluation.<key>)."""
    return validate(EvaluationConfig, section, "evaluation")


def run_knn(train_feats, train_labels, test_feats, test_labels, num_classes, cfg: KnnSettings, suffix: str = "",
            ks=None) -> tuple[dict, dict]:
    metrics, params = {}, {}
    for k in ks or cfg.ks:
        if k > len(train_feats):
            raise ConfigError(f"evaluation.knn.ks: k = {k} is larger than the kNN bank ({len(train_feats)} images)")
        scores = knn_classify(train_feats, train_labels, test_feats, num_classes, k, cfg.temperature)
        metrics[f"knn_k{k}{suffix}"] = topk_accuracy(scores, test_labels)
        params[f"knn_k{k}{suffix}"] = {"k": k, "temperature": cfg.temperature, "bank": "train split, clean views",
                                       "bank_size": len(train_feats), "similarity": "cosine (l2-normalised)",
                                       "vote": "exp(sim / temperature)"}
    return metrics, params


class _Evaluation:
    """One model's evaluation: caches the features every protocol shares."""

    def __init__(self, method, data, preprocess, cfg, device, seed, config, data_root, results_dir, progress):
        self.method, self.data, self.preprocess, self.cfg = method, data, preprocess, cfg
        self.device, self.seed, self.config = torch.device(device), seed, config
        self.data_root, self.results_dir, self.progress = data_root, results_dir, progress
        self.backbone = method.backbone
        self.bs = cfg.batch_size
        self.result = EvalResult()
        self._features: dict[str, torch.Tensor] = {}
        self._stage_features: dict[str, list[torch.Tensor]] = {}

    def desc(self, text: str) -> str | None:
        return text if self.progress else None

    def features(self, split: str) -> torch.Tensor:
        if split not in self._features:
            dataset = getattr(self.data, split)
            self._features[split] = backbone_features(self.backbone, dataset, self.preprocess, self.device, self.bs,
                                                      desc=self.desc(f"features ({split})"))
        return self._features[split]

    def stage_features(self, split: str) -> list[torch.Tensor]:
        if split not in self._stage_features:
            backbone = self.backbone
            if not hasattr(backbone, "pooled_stages"):
                raise ConfigError("evaluation.per_layer: this backbone has no pooled_stages(); set per_layer: false")
            was_training = backbone.training
            backbone.eval()
            try:
                self._stage_features[split] = extract(backbone.pooled_stages, getattr(self.data, split),
                                                      self.preprocess, self.device, self.bs,
                                                      desc=self.desc(f"stage features ({split})"))
            finally:
                backbone.train(was_training)
        return self._stage_features[split]

    def add(self, metrics: dict, params: dict) -> None:
        self.result.metrics.update(metrics)
        self.result.evaluation.update(params)

    # -- protocols -------------------------------------------------------------------------
    def knn(self) -> None:
        d = self.data
        self.add(*run_knn(self.features("train"), d.train.labels, self.features("test"), d.test.labels,
                          d.num_classes, self.cfg.knn))
        if self.cfg.per_layer:
            train, test = self.stage_features("train"), self.stage_features("test")
            for i, (tr, te) in enumerate(zip(train, test), start=1):
                self.add(*run_knn(tr, d.train.labels, te, d.test.labels, d.num_classes, self.cfg.knn,
                                  suffix=f"_B{i}", ks=[PER_LAYER_KNN_K]))

    def linear(self) -> None:
        d = self.data
        metrics, params = linear_probe(self.features("train"), d.train.labels, self.features("test"), d.test.labels,
                                       d.num_classes, self.cfg.linear, self.seed, self.device,
                                       desc=self.desc("linear probe"))
        self.add({"linear": metrics}, {"linear": params})
        if self.cfg.per_layer:
            train, test = self.stage_features("train"), self.stage_features("test")
            for i, (tr, te) in enumerate(zip(train, test), start=1):
                metrics, params = linear_probe(tr, d.train.labels, te, d.test.labels, d.num_classes,
                                               self.cfg.linear, self.seed, self.device,
                                               desc=self.desc(f"linear probe B{i}"))
                self.add({f"linear_B{i}": metrics}, {f"linear_B{i}": {**params, "stage": i}})

    @torch.no_grad()
    def clustering(self) -> None:
        d, method = self.data, self.method
        was_training = method.training
        method.eval()
        try:
            first = d.test.get_batch(torch.arange(min(2, len(d.test)))).to(self.device)
            has_head = method.cluster_logits(self.preprocess(first)) is not None
            if has_head:
                logits = extract(method.cluster_logits, d.test, self.preprocess, self.device, self.bs,
                                 desc=self.desc("cluster head"))
        finally:
            method.train(was_training)
        if has_head:
            predicted = logits.argmax(dim=1).numpy()
            num_clusters, source = logits.shape[1], "head"
            params = {"assignment": "argmax of method.cluster_logits (clean views)"}
        else:
            c = self.cfg.clustering
            predicted, params = clustering_mod.kmeans_assign(self.features("test"), d.num_classes, self.seed,
                                                             c.niter, c.nredo, c.spherical)
            num_clusters, source = params["k"], "kmeans"
        raw = clustering_mod.clustering_metrics(d.test.labels, predicted)
        num_nonempty = int(len(set(predicted.tolist())))
        self.add({"clustering": clustering_mod.as_percent_metrics(raw)},
                 {"clustering": {**params, "source": source, "split": "test", "num_clusters": int(num_clusters),
                                 "num_classes": d.num_classes, "raw_fractions": raw,
                                 "acc_matching": "Hungarian, one cluster per class; unmatched clusters count wrong"}})
        self.result.clusters = {"num_clusters": int(num_clusters), "num_nonempty": num_nonempty, "source": source}

    def semi(self) -> None:
        d, cfg = self.data, self.cfg.semi
        suite = self.suite
        for fraction in cfg.fractions:
            key = semi_mod.metric_key(fraction)
            indices, path = semi_mod.subset_indices(d.train.labels, d.num_classes, fraction, self.seed, suite,
                                                    self.results_dir)
            params = {"fraction": fraction, "num_images": len(indices),
                      "per_class": semi_mod.images_per_class(len(d.train), d.num_classes, fraction),
                      "split_file": str(path) if path is not None else None, "subset_seed": self.seed,
                      "mode": cfg.mode}
            if cfg.mode == "linear":
                idx = torch.from_numpy(indices)
                metrics, probe = linear_probe(self.features("train")[idx], d.train.labels[idx], self.features("test"),
                                              d.test.labels, d.num_classes, self.cfg.linear, self.seed,
                                              self.device, desc=self.desc(f"{key} linear"))
                params.update(probe)
            else:
                views = semi_mod.finetune_views(cfg.views, self.config, self.preprocess)
                budget = {k: getattr(cfg, k) for k in LINEAR_BUDGET_KEYS}
                model = semi_mod.finetune(self.backbone, d.train.subset(torch.from_numpy(indices)), d.num_classes,
                                          views, seed=self.seed, device=self.device,
                                          desc=self.desc(f"{key} fine-tune"), **budget)
                metrics = semi_mod.evaluate_classifier(model, d.test, self.preprocess, self.device, self.bs)
                del model
                params.update(budget)
                params.update({"views": cfg.views if self.config else "clean", "optimizer": "sgd (nesterov)",
                               "schedule": "cosine per step", "head": "linear, zero init", "seed": self.seed,
                               "trained": "whole network (copy of the backbone + head)"})
            self.add({key: metrics}, {key: params})

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
            train, test = transfer_mod.load_target(target, self.data_root)
            feats = [backbone_features(self.backbone, split, preprocess, self.device, self.bs,
                                       desc=self.desc(f"features ({target} {split.split})")) for split in (train, test)]
            metrics, params = linear_probe(feats[0], train.labels, feats[1], test.labels, train.num_classes,
                                           budget, self.seed, self.device, desc=self.desc(f"{key} probe"))
            params.update({"target": target, "num_classes": train.num_classes, "image_size": self.config.image_size,
                           "in_channels": self.config.in_channels, "normalization": "the suite's",
                           "target_channels": train.image_shape[0]})
            self.add({key: metrics}, {key: params})


def evaluate_model(method, suite_data, preprocess, eval_cfg: EvaluationConfig | dict | None, device="cpu",
                   seed: int = 0, protocols=None, *, config=None, suite: str | None = None, data_root: str | Path | None = None,
                   results_dir: str | Path | None = None, progress: bool = True) -> EvalResult:
    """Evaluate `method` (its backbone frozen, except for semi-supervised fine-tuning of a copy).

    `protocols` overrides `eval_cfg.protocols`. `config` (the suite config) supplies the suite
    name, views and normalisation for semi-supervised fine-tuning and transfer; `data_root` is where
    transfer targets are read (default $SSL_BENCH_DATA or ./data); semi-supervised subsets are
    stored under `results_dir`/splits (not stored when None).
    """
    cfg = resolve_evaluation(eval_cfg)
    chosen = list(protocols or cfg.protocols)
    unknown = [p for p in chosen if p not in PROTOCOLS]
    if unknown:
        raise ConfigError(f"protocols: unknown protocol '{unknown[0]}'; allowed: {', '.join(PROTOCOLS)}")
    run = _Evaluation(method, suite_data, preprocess, cfg, device, seed, config, data_root, results_dir, progress)
    run.suite = suite or (config.name if config is not None else suite_data.train.name)
    for name in RUN_ORDER:
        if name in chosen:
            started = time.perf_counter()
            getattr(run, name)()
            log.info("evaluation: %s took %.1f s", name, time.perf_counter() - started)
    return run.result
