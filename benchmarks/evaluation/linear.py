"""Linear probe on cached features: one linear layer trained with SGD on frozen features.

The features are extracted once (clean views) and standardised with the train split's mean and
standard deviation (an affine map, so the probe stays linear; it makes one learning rate fit every
backbone). The classifier starts at zero and is trained with SGD + momentum, mini-batches in a
seeded order and a per-step cosine schedule, for a fixed budget from the suite's config: the same
inputs give the same probe. Hand-written because it is a dozen lines of torch on a tensor that is
already in memory (scikit-learn's LogisticRegression would be far slower on 50k x 512 features).
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from benchmarks.evaluation.knn import topk_accuracy

LINEAR_BUDGET_KEYS = ("epochs", "batch_size", "lr", "momentum", "weight_decay")


@contextlib.contextmanager
def single_cpu_thread(device):
    """Small CPU matmuls run fastest on one thread: intra-op threads only add sync overhead (and
    spin badly when the cores are shared). No effect for GPU devices."""
    if torch.device(device).type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class Standardize(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Labelled(NamedTuple):
    """Features (or feature maps) of a split and their labels: what a classifier trains or is scored on."""

    features: torch.Tensor
    labels: torch.Tensor


def budget_params(budget) -> dict:
    """The probe's budget (a settings model or a dict) as the keyword arguments of fit_linear_classifier."""
    return {key: budget[key] if isinstance(budget, dict) else getattr(budget, key) for key in LINEAR_BUDGET_KEYS}


def _probe_setup(train_features: torch.Tensor, num_classes: int, n: int, budget: dict, device):
    """(standardize, linear, optimizer, scheduler, batches per epoch) of a linear probe: statistics of
    `train_features`, a zero-initialised linear layer, SGD with a per-step cosine over the whole budget
    (`budget`: budget_params' keys)."""
    standardize = Standardize(train_features.mean(dim=0), train_features.std(dim=0, unbiased=False).clamp_min(1e-6))
    linear = nn.Linear(train_features.shape[1], num_classes).to(device)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.SGD(linear.parameters(), lr=budget["lr"], momentum=budget["momentum"],
                                weight_decay=budget["weight_decay"])
    batches_per_epoch = math.ceil(n / min(budget["batch_size"], n))
    total_steps = budget["epochs"] * batches_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    return standardize, linear, optimizer, scheduler, batches_per_epoch


def fit_linear_classifier(features: torch.Tensor, labels: torch.Tensor, num_classes: int, budget, *,
                          seed: int = 0, device="cpu", desc: str | None = None) -> nn.Module:
    """Train standardise -> linear on (features, labels) with `budget` (epochs, batch_size, lr, momentum,
    weight_decay: a settings model or a dict); returns the classifier (eval mode)."""
    budget = budget_params(budget)
    x = torch.as_tensor(features).float().to(device)
    y = torch.as_tensor(labels, dtype=torch.long).to(device)
    n = len(x)
    if n == 0:
        raise ValueError("a linear probe needs at least one training example")
    standardize, linear, optimizer, scheduler, batches_per_epoch = _probe_setup(x, num_classes, n, budget, device)
    model = nn.Sequential(standardize, linear)
    generator = torch.Generator().manual_seed(seed)
    xs = model[0](x)  # standardise once; the linear layer is what trains
    with torch.enable_grad(), single_cpu_thread(device):
        for _ in tqdm(range(budget["epochs"]), desc=desc, disable=desc is None, leave=False):
            order = torch.randperm(n, generator=generator).to(device)
            # near-equal batches (no size-1 tail batch)
            for idx in torch.tensor_split(order, batches_per_epoch):
                loss = F.cross_entropy(linear(xs[idx]), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, features: torch.Tensor, device="cpu", chunk: int = 65536) -> torch.Tensor:
    x = torch.as_tensor(features).float()
    return torch.cat([model(x[i:i + chunk].to(device)).float().cpu() for i in range(0, len(x), chunk)])


def linear_probe(train: Labelled, test: Labelled, num_classes: int, budget, *, seed: int = 0, device="cpu",
                 desc: str | None = None) -> tuple[dict, dict, torch.Tensor]:
    """(top-1/top-5 in percent, the parameters used, the test scores) of a linear probe trained on `train`
    (features, labels) and scored on `test`."""
    params = budget_params(budget)
    model = fit_linear_classifier(train.features, train.labels, num_classes, params, seed=seed, device=device,
                                  desc=desc)
    scores = predict(model, test.features, device)
    metrics = topk_accuracy(scores, test.labels, exclude_zero=False)
    params.update({"optimizer": "sgd", "schedule": "cosine per step", "init": "zeros",
                   "features": "frozen, extracted once from clean views, standardised with train statistics",
                   "train_size": len(train.labels), "seed": seed})
    return metrics, params, scores


def linear_probe_on_views(view_features, train, clean_train_features, num_classes: int, budget, *, seed: int = 0,
                          device="cpu", desc: str | None = None) -> tuple[nn.Module, dict]:
    """The MoCo / dissertation linear protocol: every epoch new random-resized crops + flips of the train
    images, features through the frozen backbone (`view_features(uint8 batch, generator)`: the views'
    features; the caller holds the model in eval mode), standardised with the clean train features'
    statistics.

    Returns (the classifier on features: standardise -> linear, the parameters used); the caller scores it on
    the clean test images. Costs one forward pass of the backbone per training image and epoch (the offline
    probe with views none costs one in all).
    """
    from benchmarks.augment import step_generator

    device = torch.device(device)
    params = budget_params(budget)
    clean = torch.as_tensor(clean_train_features).float().to(device)
    n = len(train)
    standardize, linear, optimizer, scheduler, batches = _probe_setup(clean, num_classes, n, params, device)
    order_gen = torch.Generator().manual_seed(seed)
    step = 0
    for _ in tqdm(range(params["epochs"]), desc=desc, disable=desc is None, leave=False):
        for idx in torch.tensor_split(torch.randperm(n, generator=order_gen), batches):
            images = train.get_batch(idx).to(device, non_blocking=True)
            with torch.no_grad():
                feats = standardize(view_features(images, step_generator(seed, step, device)).float())
            with torch.enable_grad():
                loss = F.cross_entropy(linear(feats), train.labels[idx].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
    params.update({"optimizer": "sgd", "schedule": "cosine per step", "init": "zeros", "views": "crop_flip",
                   "features": "frozen backbone on random-resized crops + flips (new each epoch), standardised "
                               "with the clean train features' statistics", "train_size": n, "seed": seed})
    return nn.Sequential(standardize, linear), params
