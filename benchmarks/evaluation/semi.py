"""Semi-supervised evaluation: fine-tune (or linear-probe) on class-balanced subsets of the labels.

Subsets: every class gets the same number of images -- floor(fraction * N / num_classes) for a
fraction (1% / 10%, key semi_<p>pct), or a count (images per class, key semi_<n>perclass) --, the
first ones of a per-class permutation seeded by the subset seed alone (evaluation.semi.subsets, a seed
list of its own, independent of the pretraining seed), so smaller subsets are contained in larger ones
and every method of a suite sees the same images. Each subset is stored once per (suite, size, subset
seed) as JSON under `<results_dir>/splits/<suite>/semi_<n>pc_subset<seed>.json` and read back by every
later run.

Fine-tuning (the default, as the CARL dissertation: 50 epochs): a copy of the backbone plus a
zero-initialised linear head, all trained with SGD + momentum and a per-step cosine schedule.
Views (`evaluation.semi.views`): "crop_flip" (default; the suite's random resized crop and flip
only, as SimCLR's fine-tuning), "augment" (the suite's full first view pipeline) or "clean".
Fine-tuning from the random-init reference row is the supervised baseline trained on the labelled
subset only (the dissertation's Table 5.3 baseline). Hand-written because the loop is a few lines
over the suite's own batched views; a Lightning Trainer would add checkpoints and loggers this step
does not want.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from benchmarks.augment import BatchAugment, Normalization, step_generator
from benchmarks.data import ImageDataset
from benchmarks.errors import ConfigError, RecordExistsError
from benchmarks.evaluation.features import extract
from benchmarks.evaluation.knn import topk_accuracy
from benchmarks.evaluation.linear import budget_params, single_cpu_thread
from benchmarks.records import atomic_write_text

SPLIT_FORMAT = "ssl-bench-semi-split/2"
SEMI_VIEWS = ("crop_flip", "augment", "clean")


def percent_label(fraction: float) -> str:
    """0.01 -> "1", 0.1 -> "10", 0.005 -> "0.5" (used in the metric keys semi_<pct>pct)."""
    return f"{round(fraction * 100, 6):g}"


def metric_key(fraction: float) -> str:
    return f"semi_{percent_label(fraction)}pct"


def count_key(per_class: int) -> str:
    return f"semi_{per_class}perclass"


def images_per_class(num_images: int, num_classes: int, fraction: float) -> int:
    per_class = math.floor(fraction * num_images / num_classes + 1e-9)
    if per_class < 1:
        raise ConfigError(f"evaluation.semi.fractions: {fraction} of {num_images} labelled images is fewer than "
                          f"one image per class ({num_classes} classes); use a fraction of at least "
                          f"{num_classes / num_images:.4g}")
    return per_class


def check_count(labels, num_classes: int, per_class: int) -> int:
    """`per_class` if every class has that many labelled images, else a ConfigError naming the fix."""
    counts = torch.bincount(torch.as_tensor(labels).long().cpu(), minlength=num_classes)
    smallest = int(counts.min())
    if per_class > smallest:
        raise ConfigError(f"evaluation.semi.per_class: {per_class} images per class, but the smallest class of the "
                          f"labelled train split has {smallest}; use counts <= {smallest}")
    return per_class


def draw_balanced_subset(labels, num_classes: int, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices: the first `per_class` images of each class in an order seeded by `seed` alone.

    A class with fewer images than that contributes all of them.
    """
    labels = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64)
    if per_class < 1:
        raise ConfigError(f"evaluation.semi: a subset needs at least one image per class, got {per_class}")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        chosen.append(rng.permutation(members)[:per_class])  # one permutation per class -> nested subsets
    return np.sort(np.concatenate(chosen))


def split_path(results_dir: str | Path, suite: str, per_class: int, seed: int) -> Path:
    return Path(results_dir) / "splits" / suite / f"semi_{per_class}pc_subset{seed}.json"


def subset_indices(labels, num_classes: int, per_class: int, seed: int, suite: str,
                   results_dir: str | Path | None) -> tuple[np.ndarray, Path | None]:
    """The stored subset for (suite, images per class, subset seed), drawn and stored on first use.

    With results_dir=None the subset is drawn (deterministically) without being stored.
    """
    labels_np = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64)
    if results_dir is None:
        return draw_balanced_subset(labels_np, num_classes, per_class, seed), None
    path = split_path(results_dir, suite, per_class, seed)
    if not path.exists():
        indices = draw_balanced_subset(labels_np, num_classes, per_class, seed)
        payload = {"format": SPLIT_FORMAT, "suite": suite, "per_class": per_class, "subset_seed": seed,
                   "train_size": len(labels_np), "num_classes": num_classes,
                   "indices": indices.tolist(), "labels": labels_np[indices].tolist()}
        try:  # overwrite=False: if a parallel run stored it first, theirs wins and is read below
            atomic_write_text(path, json.dumps(payload) + "\n", overwrite=False)
        except RecordExistsError:
            pass
    return read_subset(path, labels_np), path


def read_subset(path: Path, labels: np.ndarray) -> np.ndarray:
    """Indices from a stored subset file, checked against the train split they index."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        indices = np.asarray(payload["indices"], dtype=np.int64)
        stored_labels = np.asarray(payload["labels"], dtype=np.int64)
        train_size = int(payload["train_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a readable semi-supervised split file ({exc}); delete it to redraw") from exc
    if (train_size != len(labels) or len(indices) != len(stored_labels) or len(indices) == 0
            or indices.min() < 0 or indices.max() >= len(labels) or not np.array_equal(labels[indices], stored_labels)):
        raise ConfigError(f"{path}: this split was drawn for another version of the train split "
                          f"({train_size} images stored, {len(labels)} now, or other labels); delete it to redraw "
                          "(every method of the suite must then be re-evaluated on the new split)")
    return indices


def finetune_views(view_mode: str, config, preprocess):
    """(batch of uint8 images, generator) -> normalised training view; `config` is the SuiteConfig (its
    first view spec and normalisation: the suite's shared pipeline)."""
    if view_mode == "clean" or config is None:
        return lambda images, generator: preprocess(images)
    spec = config.augment.views[0].model_copy(update={"count": 1})
    if view_mode == "crop_flip":
        spec = spec.model_copy(update=dict(jitter_p=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0,
                                           grayscale_p=0.0, blur_p=0.0, solarize_p=0.0))
    norm = config.augment.normalization
    augment = BatchAugment([spec], Normalization(tuple(norm.mean), tuple(norm.std)))

    def views(images, generator):
        return augment.to(images.device)(images, generator)[0]

    return views


def finetune(backbone: nn.Module, train: ImageDataset, num_classes: int, views, budget, *, seed: int, device="cpu",
             desc: str | None = None) -> nn.Module:
    """Fine-tune a copy of `backbone` + a new linear head on `train` (all labelled) with `budget` (epochs,
    batch_size, lr, momentum, weight_decay: a settings model or a dict); returns it (eval mode)."""
    budget = budget_params(budget)
    epochs, batch_size, lr, momentum = budget["epochs"], budget["batch_size"], budget["lr"], budget["momentum"]
    base = getattr(backbone, "_orig_mod", backbone)  # a torch.compile'd backbone: copy the module itself
    model = nn.Sequential(copy.deepcopy(base), nn.Linear(base.feature_dim, num_classes)).to(device)
    nn.init.zeros_(model[1].weight)
    nn.init.zeros_(model[1].bias)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=budget["weight_decay"],
                                nesterov=momentum > 0)
    n = len(train)
    batches = math.ceil(n / min(batch_size, n))
    total = epochs * batches
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    order_gen = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    step = 0
    with torch.enable_grad(), single_cpu_thread(device):  # the CPU case is small models (digits)
        for _ in tqdm(range(epochs), desc=desc, disable=desc is None, leave=False):
            for idx in torch.tensor_split(torch.randperm(n, generator=order_gen), batches):
                images = train.get_batch(idx).to(device, non_blocking=True)
                labels = train.labels[idx].to(device)
                x = views(images, step_generator(seed, step, device))
                with autocast:
                    loss = F.cross_entropy(model(x).float(), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
    return model.eval()


@torch.no_grad()
def evaluate_classifier(model: nn.Module, test: ImageDataset, preprocess, device="cpu",
                        batch_size: int = 512) -> dict[str, float]:
    scores = extract(model, test, preprocess, device, batch_size)
    return topk_accuracy(scores, test.labels)
