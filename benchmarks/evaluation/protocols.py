"""Runs the suite's evaluation protocols on a trained model -> metrics for the run record.

Every method goes through exactly this code with the parameters from the suite's
`evaluation` section, which are stored beside the metrics in the record.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from benchmarks.config import merge_checked
from benchmarks.errors import ConfigError
from benchmarks.evaluation.features import backbone_features
from benchmarks.evaluation.knn import knn_classify, topk_accuracy

PROTOCOLS = ("knn", "linear", "semi", "transfer", "clustering")

EVALUATION_DEFAULTS: dict = {
    "protocols": ["knn"],
    "batch_size": 512,
    "knn": {"ks": [20, 200], "temperature": 0.1},
}


@dataclass
class EvalResult:
    metrics: dict = field(default_factory=dict)  # protocol -> metric -> percent
    evaluation: dict = field(default_factory=dict)  # protocol -> parameters used
    clusters: dict | None = None


def resolve_evaluation(section: dict) -> dict:
    cfg = merge_checked(EVALUATION_DEFAULTS, section, "evaluation")
    unknown = [p for p in cfg["protocols"] if p not in PROTOCOLS]
    if unknown:
        raise ConfigError(f"evaluation.protocols: unknown protocol '{unknown[0]}'; allowed: {', '.join(PROTOCOLS)}")
    return cfg


def run_knn(train_feats, train_labels, test_feats, test_labels, num_classes, cfg) -> tuple[dict, dict]:
    metrics = {}
    for k in cfg["ks"]:
        if k > len(train_feats):
            raise ConfigError(f"evaluation.knn.ks: k = {k} is larger than the kNN bank ({len(train_feats)} images)")
        scores = knn_classify(train_feats, train_labels, test_feats, num_classes, k, cfg["temperature"])
        metrics[f"knn_k{k}"] = topk_accuracy(scores, test_labels)
    return metrics, {f"knn_k{k}": {"k": k, "temperature": cfg["temperature"], "bank": "train split, clean views",
                                   "similarity": "cosine"} for k in cfg["ks"]}


@torch.no_grad()
def evaluate_model(method, suite_data, preprocess, eval_cfg: dict, device="cpu", seed: int = 0,
                   protocols=None) -> EvalResult:
    """Evaluate `method.backbone` (frozen) with the suite's protocols."""
    cfg = resolve_evaluation(eval_cfg)
    protocols = list(protocols or cfg["protocols"])
    result = EvalResult()
    backbone = method.backbone
    bs = cfg["batch_size"]
    train_feats = backbone_features(backbone, suite_data.train, preprocess, device, bs, desc="features (train)")
    test_feats = backbone_features(backbone, suite_data.test, preprocess, device, bs, desc="features (test)")
    if "knn" in protocols:
        metrics, params = run_knn(train_feats, suite_data.train.labels, test_feats, suite_data.test.labels,
                                  suite_data.num_classes, cfg["knn"])
        result.metrics.update(metrics)
        result.evaluation.update(params)
    return result
