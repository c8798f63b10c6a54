"""SSL++'s "NIN block" classifier (Table III; RotNet's ConvClassifier on frozen block features).

A new NIN block (three conv-BN-ReLU layers: 3x3, 1x1, 1x1, 192 channels), global average pooling
and a linear softmax layer, trained with labels on the frozen feature maps of one backbone block
(SSL++ sec. V-A.3: input 192x8x8, "spatially averaged pooled to 192 and then fed into the linear
soft-max layer"; RotNet: architectures/NonLinearClassifier.py, cls_type 'NIN_ConvBlock3').

Budget (SSL++ Table II, evaluation stage, CIFAR-10): SGD, batch 128, lr 0.1, momentum 0.9, weight
decay 5e-4, 200 epochs, lr steps at epochs [100, 150]; the step factor is 10 (gamma 0.1: sec.
V-A.4, "in other methods [than AET] the factor is 10"; RotNet's own configs use 0.2). Nesterov
momentum as in RotNet's config (config/CIFAR10_ConvClassifier_on_RotNet_NIN4blocks_Conv2_feats.py;
SSL++ does not say). Differences from RotNet, by design of this suite: the maps are precomputed once
from clean images (no augmentation while training the classifier), and the layers keep torch's
default initialisation (under the seed) instead of RotNet's custom normal init.

Hand-written: a small training loop on a tensor already in memory (no library trains a conv head on
cached maps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from benchmarks.backbones import nin_block
from benchmarks.errors import ConfigError
from benchmarks.evaluation.knn import topk_accuracy
from benchmarks.evaluation.linear import Labelled

# SSL++ Table II (evaluation stage on CIFAR-10; STL-10 uses batch 64) and sec. V-A.4 (factor 10)
BLOCK_CLASSIFIER_DEFAULTS = {"epochs": 200, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                             "milestones": [100, 150], "gamma": 0.1, "nesterov": True}
BLOCK_WIDTH = 192  # RotNet's NIN_ConvBlock3


class BlockClassifier(nn.Module):
    """NIN block (3x3, 1x1, 1x1 conv-BN-ReLU) -> global average pooling -> linear (logits)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = BLOCK_WIDTH):
        super().__init__()
        self.block = nin_block(in_channels, (width, width, width), 3)
        self.linear = nn.Linear(width, num_classes)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.linear(self.block(maps).mean(dim=(2, 3)))


def _check_maps(maps: torch.Tensor, what: str) -> torch.Tensor:
    maps = torch.as_tensor(maps).detach()  # frozen: never a path back into the backbone
    if maps.dim() != 4:
        raise ValueError(f"block classifier: {what} maps must be [N, C, H, W], got {tuple(maps.shape)}")
    bad = int((~torch.isfinite(maps.flatten(1))).any(dim=1).sum()) if maps.numel() else 0
    if bad:
        raise ValueError(f"block classifier: {bad} of {len(maps)} {what} feature maps are not finite (NaN or inf)")
    return maps


def block_classifier_budget(budget=None) -> dict:
    """The classifier's budget (a BlockClassifierSettings, a dict or None) over BLOCK_CLASSIFIER_DEFAULTS, with
    its width; an unknown key is refused naming evaluation.block_classifier.<key>."""
    budget = dict(budget or {}) if isinstance(budget, dict) or budget is None else budget.model_dump(exclude={"blocks"})
    unknown = sorted(set(budget) - set(BLOCK_CLASSIFIER_DEFAULTS) - {"width"})
    if unknown:
        raise ConfigError(f"evaluation.block_classifier.{unknown[0]}: unknown key; allowed: "
                          f"{', '.join(sorted(BLOCK_CLASSIFIER_DEFAULTS))}")
    return {**BLOCK_CLASSIFIER_DEFAULTS, "width": BLOCK_WIDTH, **budget}


def train_block_classifier(feature_maps_train: torch.Tensor, labels: torch.Tensor, num_classes: int, budget=None, *,
                           seed: int = 0, device="cpu", desc: str | None = None) -> nn.Module:
    """Train a BlockClassifier on frozen maps [N, C, H, W]; returns it in eval mode. `budget`: epochs,
    batch_size, lr, momentum, weight_decay, milestones, gamma, nesterov and width (block_classifier_budget:
    a settings model or a dict; SSL++ Table II's defaults where it names none).

    SGD with momentum and step decay (lr * gamma at each milestone epoch). Deterministic given the
    seed: the layers are initialised under torch.manual_seed(seed) inside a forked RNG (the
    caller's RNG state is untouched) and the mini-batch order comes from a generator seeded alike
    (bitwise on the CPU; on a GPU up to cuDNN's own nondeterminism).
    """
    b = block_classifier_budget(budget)
    # the maps go to the device once (CIFAR-10's 50k x 192 x 8 x 8 floats are 2.4 GB)
    x = _check_maps(feature_maps_train, "train").float().to(device)
    y = torch.as_tensor(labels, dtype=torch.long).to(device)
    n = len(x)
    if n == 0 or len(y) != n:
        raise ValueError(f"block classifier: {n} train maps for {len(y)} labels")
    if b["epochs"] < 1 or b["batch_size"] < 1:
        raise ValueError(f"block classifier: epochs and batch_size must be >= 1, got {b['epochs']} and "
                         f"{b['batch_size']}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlockClassifier(x.shape[1], num_classes, b["width"])
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=b["lr"], momentum=b["momentum"], weight_decay=b["weight_decay"],
                                nesterov=b["nesterov"] and b["momentum"] > 0)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(b["milestones"]), gamma=b["gamma"])
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(b["batch_size"], n)
    model.train()
    with torch.enable_grad():
        for _ in tqdm(range(b["epochs"]), desc=desc, disable=desc is None, leave=False):
            order = torch.randperm(n, generator=generator).to(device)
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                if len(idx) < 2 and n >= 2:  # a 1-image tail batch has no batch statistics for BN
                    continue
                loss = F.cross_entropy(model(x[idx]), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            scheduler.step()  # per epoch: the milestones are epochs
    return model.eval()


@torch.no_grad()
def block_classifier_predict(model: nn.Module, feature_maps: torch.Tensor, device="cpu",
                             batch_size: int = 1024) -> torch.Tensor:
    """Logits [N, num_classes] of a trained block classifier (eval mode: BN running statistics)."""
    x = _check_maps(feature_maps, "test").float()
    model.eval()
    return torch.cat([model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


def block_classifier_accuracy(model: nn.Module, feature_maps_test: torch.Tensor, labels_test: torch.Tensor,
                              device="cpu", batch_size: int = 1024) -> dict[str, float]:
    """{"top1", "top5"} in percent on the test maps (SSL++ Table III reports top-1)."""
    scores = block_classifier_predict(model, feature_maps_test, device, batch_size)
    return topk_accuracy(scores, labels_test, ks=(1, 5), exclude_zero=False)


def block_classifier_probe(train: Labelled, test: Labelled, num_classes: int, budget=None, *, seed: int = 0,
                           device="cpu", desc: str | None = None) -> tuple[dict, dict]:
    """Train on one block's train maps, score the test maps (each `Labelled(maps, labels)`): (metrics, parameters
    for the record)."""
    params = block_classifier_budget(budget)
    model = train_block_classifier(train.features, train.labels, num_classes, params, seed=seed, device=device,
                                   desc=desc)
    metrics = block_classifier_accuracy(model, test.features, test.labels, device)
    width = params["width"]
    params.update({"optimizer": "sgd", "schedule": "step decay per epoch (milestones, gamma)",
                   "classifier": f"NIN block ({width}: 3x3, 1x1, 1x1 conv-BN-ReLU) + global average pool + linear",
                   "init": "torch default, seeded",
                   "features": "frozen block feature maps, extracted once from clean views",
                   "input_shape": list(torch.as_tensor(train.features).shape[1:]), "train_size": len(train.labels),
                   "seed": seed})
    return metrics, params
