"""Synthetic, valid run records (schema version 3, built as schema 2 and converted by
``benchmarks.records.upgrade_record``) with per-test-image predictions, for the report's tests.

No training: predictions are built to a wanted accuracy (exactly round(acc * n / 100) images correct) or
given as arrays, and the metrics are computed from them (scikit-learn for NMI/AMI/ARI, independent of
``reports.stats``), so every record agrees with its predictions unless a test edits one on purpose.
Written with ``benchmarks.records.write_record(record, path, predictions=...)``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, normalized_mutual_info_score

from benchmarks.data import DISPLAY_NAMES
from benchmarks.records import record_path, upgrade_record, write_record

N_TEST = 200
NUM_CLASSES = 10
DISPLAY = {"simclr": "SimCLR", "byol": "BYOL", "swav": "SwAV", "carl": "CARL", "carp": "CARP", "uic": "UIC",
           "self_classifier": "Self-Classifier", "sslpp": "SSL++ (Rotation)", "rotation": "Rotation",
           "random_init": "Random init", "supervised": "Supervised", "iic": "IIC"}


DISPLAY_NAMES_TO_LOADER = {display: loader for loader, display in DISPLAY_NAMES.items()}


def make_labels(n: int = N_TEST, num_classes: int = NUM_CLASSES) -> np.ndarray:
    return (np.arange(n) % num_classes).astype(np.int64)


def fingerprint(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def correct_mask(n: int, accuracy: float, seed: int = 0) -> np.ndarray:
    """Exactly round(accuracy * n / 100) images correct, at positions drawn with `seed`."""
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[: int(round(accuracy * n / 100))]] = True
    return mask


def top5_from_correct(labels: np.ndarray, correct: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """int16 [n, 5] ranked classes: the true class first where correct, else second (top-5 always right)."""
    wrong = (labels + 1) % num_classes
    first = np.where(correct, labels, wrong)
    second = np.where(correct, wrong, labels)
    rest = np.stack([(labels + i) % num_classes for i in (2, 3, 4)], axis=1)
    return np.column_stack([first, second, rest]).astype(np.int16)


def clusters_from_labels(labels: np.ndarray, k: int, noise: float = 0.2, seed: int = 0) -> np.ndarray:
    """Cluster per image: its class spread over k // classes clusters, a `noise` fraction sent elsewhere."""
    rng = np.random.default_rng(seed)
    classes = int(labels.max()) + 1
    per = max(1, k // classes)
    assign = (labels * per + rng.integers(0, per, len(labels))) % k
    moved = rng.random(len(labels)) < noise
    assign[moved] = rng.integers(0, k, int(moved.sum()))
    return assign.astype(np.int32)


def clustering_metrics(labels: np.ndarray, assign: np.ndarray, k: int) -> dict[str, float]:
    """Percent: NMI/AMI/ARI and ACC (one-to-one) when k = classes, else ACC_M2O (many-to-one)."""
    classes = int(labels.max()) + 1
    counts = np.zeros((classes, max(k, int(assign.max()) + 1)))
    np.add.at(counts, (labels, assign), 1)
    out = {"NMI": 100 * normalized_mutual_info_score(labels, assign),
           "AMI": 100 * adjusted_mutual_info_score(labels, assign),
           "ARI": 100 * adjusted_rand_score(labels, assign)}
    if k == classes:
        rows, cols = linear_sum_assignment(counts, maximize=True)
        out["ACC"] = 100 * counts[rows, cols].sum() / len(labels)
    else:
        out["ACC_M2O"] = 100 * counts.max(axis=0).sum() / len(labels)
    return out


def protocol_of(key: str) -> str:
    """The protocol of a schema-2 key as the evaluation records it (the fixtures name evaluations by key)."""
    for prefix, protocol in (("knn_k10_", "knn_k10"), ("knn_k", "knn"), ("semi_", "semi"), ("finetune_", "finetune"),
                             ("transfer_linear:", "transfer"), ("clustering_head_", "clustering_head"),
                             ("block_classifier_", "block_classifier"), ("linear_", "linear")):
        if key.startswith(prefix):
            return protocol
    return key


def default_settings(key: str) -> dict:
    protocol = protocol_of(key)
    if protocol == "linear":
        return {"views": "crop_flip", "epochs": 100, "lr": 0.1}
    if protocol == "knn":
        return {"k": int(key[5:].split("_")[0]), "temperature": 0.07}
    if protocol == "semi":
        size = key[len("semi_"):]
        return {"mode": "finetune", "epochs": 50, "views": "crop_flip",
                **({"per_class": int(size[:-len("perclass")])} if size.endswith("perclass")
                   else {"fraction": round(float(size[:-len("pct")]) / 100, 6)})}
    if protocol == "finetune":
        return {"mode": "finetune", "epochs": 50, "views": "crop_flip"}
    if protocol == "transfer":
        return {"epochs": 50, "lr": 0.1}
    if protocol == "clustering":
        return {"niter": 100, "nredo": 5}
    if protocol == "clustering_head":
        return {"source": "head", "k": int(key[len("clustering_head_k"):].split("_")[0])}
    return {}


def make_run(*, suite="cifar10", dataset="CIFAR-10", method="simclr", method_base=None, variant=None,
             display=None, seed=0, epochs=200, backbone="resnet18_cifar", paper_reference=None,
             method_config=None, accuracy=None, correct=None, clusters=None, settings=None, params=None,
             labels=None, status="completed", created=None, history=None, message=None, transfer_labels=None,
             extra_metrics=None) -> tuple[dict, dict]:
    """(record, predictions). `accuracy`: {key: top-1 %} (semi keys may give a list: one per subset);
    `correct`: {key: bool [n] or [subsets, n]}; `clusters`: {clustering key: (k, noise[, seed]) or int array};
    `settings` / `params`: {key: evaluation[key]["settings"] / extra evaluation[key] parameters};
    `extra_metrics`: {key: {metric: value}} recorded without predictions (e.g. SSL++'s block average)."""
    method_base = method_base or method.split("/")[0]
    labels = make_labels() if labels is None else labels
    n = len(labels)
    method_config = method_config or {"optimizer": {"lr": 0.03, "name": "sgd"},
                                      "hparams": {"temperature": 0.2}}
    config = {"name": suite, "backbone": backbone, "method": method_config, "evaluation": {"batch_size": 512}}
    if variant is not None and paper_reference is not None:  # a variant's own section names its paper
        config["methods"] = {method: {"paper": paper_reference}}
    predictions: dict[str, np.ndarray] = {"labels": labels}
    metrics, evaluation, cluster_info = {}, {}, {}
    masks = dict(correct or {})
    for i, (key, acc) in enumerate(sorted((accuracy or {}).items())):
        accs = acc if isinstance(acc, (list, tuple)) else [acc]
        stack = np.stack([correct_mask(n, a, seed=1000 * seed + 10 * i + j) for j, a in enumerate(accs)])
        masks[key] = stack if isinstance(acc, (list, tuple)) else stack[0]
    for key, mask in sorted(masks.items()):
        mask = np.asarray(mask, dtype=bool)
        key_labels = labels
        if key.startswith("transfer_linear:") and transfer_labels is not None:
            key_labels = transfer_labels
            predictions[f"{key}:labels"] = key_labels
        classes = int(key_labels.max()) + 1
        if mask.ndim == 2:  # several labelled subsets: [subsets, n, 5]
            predictions[key] = np.stack([top5_from_correct(key_labels, m, classes) for m in mask])
        else:
            predictions[key] = top5_from_correct(key_labels, mask, classes)
        metrics[key] = {"top1": 100.0 * float(mask.mean()), "top5": 100.0}
    for key, spec in sorted((clusters or {}).items()):
        if isinstance(spec, tuple):  # (k, noise) or (k, noise, assignment seed)
            k, noise = spec[:2]
            draw = spec[2] if len(spec) > 2 else seed + 7 * len(key)
            assign = clusters_from_labels(labels, k, noise, seed=draw)
        else:
            assign = np.asarray(spec, dtype=np.int32)
            k = int(key.rpartition("_k")[2].split("_")[0]) if key != "clustering" else int(labels.max()) + 1
        predictions[key] = assign
        metrics[key] = clustering_metrics(labels, assign, k)
        cluster_info[key] = {"num_clusters": k, "num_nonempty": int(len(np.unique(assign))),
                             "num_classes": int(labels.max()) + 1,
                             "source": "kmeans" if key == "clustering" else "head",
                             "acc": "one-to-one" if k == int(labels.max()) + 1 else "many-to-one"}
    metrics.update(extra_metrics or {})
    for key in metrics:
        chosen = (settings or {}).get(key, default_settings(key))
        # a transfer evaluation names its target by the dataset's loader name, as the runner records it
        target = {"target": DISPLAY_NAMES_TO_LOADER.get(key.partition(":")[2], key.partition(":")[2])} \
            if protocol_of(key) == "transfer" else {}
        evaluation[key] = {"protocol": protocol_of(key), "settings": chosen, **target, **(params or {}).get(key, {})}
    training = {"suite": suite, "method": method, "method_config": method_config, "backbone": backbone,
                "epochs": epochs}
    fps = {"training": fingerprint({**training, "seed": seed}), "settings": fingerprint(training),
           "evaluation": fingerprint({k: v["settings"] for k, v in evaluation.items()})}
    fps["run"] = fingerprint([fps["training"], fps["evaluation"]])
    record = {
        "schema_version": 2, "status": status, "suite": suite, "dataset": dataset,
        "method": method, "method_base": method_base, "variant": variant,
        "method_display": display or DISPLAY.get(method_base, method_base) + (f" ({variant})" if variant
                                                                              else ""),
        "paper_reference": paper_reference, "is_reference": method_base in ("random_init", "supervised"),
        "seed": seed, "epochs": epochs, "backbone": backbone, "batch_size": 256, "fingerprints": fps,
        "config": config, "method_config": method_config, "metrics": metrics, "evaluation": evaluation,
        "clusters": cluster_info, "history": history or [],
        "provenance": {"pretraining": {}, "evaluations": []},
        "versions": {"torch": "2.5"}, "git_commit": None, "device": "cpu", "cpu": None, "wall_time_s": 1.0,
        "throughput_images_per_s": None, "peak_memory_mb": None, "checkpoint": None,
        "created": created or f"2025-01-01T00:00:{seed:02d}+00:00", "message": message,
    }
    return upgrade_record(record), predictions


def write_run(results: Path, path: Path | str | None = None, **kw) -> Path:
    """Write one synthetic run under `results` (its canonical path unless `path`, relative to `results`)."""
    record, predictions = make_run(**kw)
    if path is None:
        path = record_path(results, record["suite"], record["method"], record["epochs"], record["seed"],
                           record["fingerprints"]["run"])
    else:
        path = Path(results) / path
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_record(record, path, predictions=predictions if record["status"] == "completed" else None)
