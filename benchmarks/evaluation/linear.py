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


def budget_params(budget) -> dict:
    """The probe's budget (a settings model or a dict) as the keyword arguments of fit_linear_classifier."""
    return {key: budget[key] if isinstance(budget, dict) else getattr(budget, key) for key in LINEAR_BUDGET_KEYS}


def _probe_setup(train_features: torch.Tensor, num_classes: int, n: int, *, epochs: int, batch_size: int, lr: float,
                 momentum: float, weight_decay: float, device):
    """(standardize, linear, optimizer, scheduler, batches per epoch) of a linear probe: statistics of
    `train_features`, a zero-initialised linear layer, SGD with a per-step cosine over the whole budget."""
    standardize = Standardize(train_features.mean(dim=0), train_features.std(dim=0, unbiased=False).clamp_min(1e-6))
    linear = nn.Linear(train_features.shape[1], num_classes).to(device)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.SGD(linear.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    batches_per_epoch = math.ceil(n / min(batch_size, n))
    total_steps = epochs * batches_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    return standardize, linear, optimizer, scheduler, batches_per_epoch


def fit_linear_classifier(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, epochs: int,
                          batch_size: int, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                          seed: int = 0, device="cpu", desc: str | None = None) -> nn.Module:
    """Train standardise -> linear on (features, labels); returns the classifier (eval mode)."""
    x = torch.as_tensor(features).float().to(device)
    y = torch.as_tensor(labels, dtype=torch.long).to(device)
    n = len(x)
    if n == 0:
        raise ValueError("a linear probe needs at least one training example")
    standardize, linear, optimizer, scheduler, batches_per_epoch = _probe_setup(
        x, num_classes, n, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
        weight_decay=weight_decay, device=device)
    model = nn.Sequential(standardize, linear)
    generator = torch.Generator().manual_seed(seed)
    xs = model[0](x)  # standardise once; the linear layer is what trains
    with torch.enable_grad(), single_cpu_thread(device):
        for _ in tqdm(range(epochs), desc=desc, disable=desc is None, leave=False):
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


def linear_probe(train_features, train_labels, test_features, test_labels, num_classes: int, budget,
                 seed: int = 0, device="cpu", desc: str | None = None, return_scores: bool = False):
    """Top-1/top-5 (percent) of a linear probe and the parameters used (+ the test scores if `return_scores`)."""
    params = budget_params(budget)
    model = fit_linear_classifier(train_features, train_labels, num_classes, seed=seed, device=device, desc=desc,
                                  **params)
    scores = predict(model, test_features, device)
    metrics = topk_accuracy(scores, test_labels, exclude_zero=False)
    params.update({"optimizer": "sgd", "schedule": "cosine per step", "init": "zeros",
                   "features": "frozen, extracted once from clean views, standardised with train statistics",
                   "train_size": len(train_labels), "seed": seed})
    return (metrics, params, scores) if return_scores else (metrics, params)


def linear_probe_on_views(feature_fn, model: nn.Module, train, test, num_classes: int, views, preprocess,
                          clean_train_features, budget, seed: int = 0, device="cpu", batch_size: int = 512,
                          desc: str | None = None):
    """The MoCo / dissertation linear protocol: every epoch new random-resized crops + flips of the train
    images (`views(uint8 batch, generator)`), features through the frozen `feature_fn` (model in eval mode),
    standardised with the clean train features' statistics; scored on the clean test images.

    Returns (metrics, parameters, test scores). Costs one forward pass of the backbone per training image
    and epoch (the offline probe with views none costs one in all).
    """
    from benchmarks.augment import step_generator

    device = torch.device(device)
    params = budget_params(budget)
    clean = torch.as_tensor(clean_train_features).float().to(device)
    n = len(train)
    standardize, linear, optimizer, scheduler, batches = _probe_setup(clean, num_classes, n, device=device, **params)
    order_gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    step = 0
    try:
        for _ in tqdm(range(params["epochs"]), desc=desc, disable=desc is None, leave=False):
            for idx in torch.tensor_split(torch.randperm(n, generator=order_gen), batches):
                images = train.get_batch(idx).to(device, non_blocking=True)
                with torch.no_grad():
                    feats = standardize(feature_fn(views(images, step_generator(seed, step, device))).float())
                with torch.enable_grad():
                    loss = F.cross_entropy(linear(feats), train.labels[idx].to(device))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
        with torch.no_grad():
            from benchmarks.evaluation.features import extract

            scores = extract(lambda x: linear(standardize(feature_fn(x).float())), test, preprocess, device, batch_size)
    finally:
        model.train(was_training)
    metrics = topk_accuracy(scores, test.labels, exclude_zero=False)
    params.update({"optimizer": "sgd", "schedule": "cosine per step", "init": "zeros", "views": "crop_flip",
                   "features": "frozen backbone on random-resized crops + flips (new each epoch), standardised "
                               "with the clean train features' statistics", "train_size": n, "seed": seed})
    return metrics, params, scores
