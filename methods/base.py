"""What every method shares: hyperparameter handling, batch/epoch context, EMA.

A method subclass holds only what differs between methods: its heads, its loss,
its cluster assignment and its hyperparameters, declared as a typed model:

    class Hparams(MethodHparams):
        temperature: float = Field(0.2, gt=0)

`methods/` imports nothing from `benchmarks/`: the error types, the DDP gather and the
typed-model base live below both, in `ssl_common`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ssl_common.distributed import gather_cat
from ssl_common.errors import ConfigError
from ssl_common.typed import MethodHparams, OptimizerConfig, validate


@dataclass
class DataInfo:
    num_classes: int  # true classes of the labelled set (for over-clustering defaults)
    num_train: int  # images in the pretraining set (label stores are this long)
    in_channels: int
    image_size: int


@dataclass
class TrainBatch:
    views: list[torch.Tensor]  # augmented, normalised views (2 or more)
    indices: torch.Tensor  # dataset indices of the images (label stores)
    labels: torch.Tensor | None  # only given to methods with uses_labels=True (supervised reference)
    epoch: int
    step: int  # global optimizer step
    max_epochs: int
    generator: torch.Generator  # seeded by (seed, step): per-step randomness that survives resume
    stage: int = 0  # index of the pretraining stage (methods with several, see SSLMethod.stages)


@dataclass
class EpochContext:
    epoch: int
    max_epochs: int
    seed: int
    # predict(fn) runs fn(normalised clean images) over the whole pretraining set in
    # index order and returns the concatenated outputs [num_train, ...]
    predict: Callable[[Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]
    device: torch.device
    # true labels of the pretraining set in index order (-1 = unlabelled), or None; only
    # for logging the quality of pseudo-labels (NMI), never for training
    labels: torch.Tensor | None = None
    stage: int = 0


@dataclass
class Stage:
    """One pretraining stage with a budget of its own (SSL++: the IIC clustering stage, then Rotation).

    The trainer runs the stages one after another, each a fit of its own (own batch size, epochs,
    optimizer and LR schedule, own epoch checkpoint, so a resume continues in the right stage).
    """

    name: str
    epochs: int
    batch_size: int
    optimizer: OptimizerConfig
    augment: Any = None  # the stage's views (an AugmentConfig); None = the method's


class SSLMethod(nn.Module):
    """Base class of every method.

    Subclasses set `display_name`, `paper` (seed paper id in paper_results.csv, if
    any) and their `Hparams` model, build their heads in `__init__` from
    `self.backbone.feature_dim`, and implement `training_loss`. `self.hparams` is the
    validated `Hparams` instance (attributes, not string keys).
    """

    name: ClassVar[str] = "?"  # set by @register_method
    display_name: ClassVar[str] = "?"
    paper: ClassVar[str | None] = None
    Hparams: ClassVar[type[MethodHparams]] = MethodHparams
    # bump when a change to the method's code changes what it computes: the version is part of the
    # run fingerprint, so records of the older code are never taken for the new one's
    version: ClassVar[int] = 1
    uses_labels: ClassVar[bool] = False
    is_reference: ClassVar[bool] = False
    skips_training: ClassVar[bool] = False  # random_init: evaluated as initialised
    has_unused_parameters: ClassVar[bool] = False  # some parameters get no gradient in a step (DDP must allow it)

    def __init__(self, backbone: nn.Module, data: DataInfo, hparams: MethodHparams | dict | None = None):
        super().__init__()
        self.backbone = backbone
        self.data = data
        self.hparams = self.resolve_hparams(hparams)
        self.check_hparams()

    @classmethod
    def resolve_hparams(cls, hparams: MethodHparams | dict | None = None, where: str | None = None) -> MethodHparams:
        """`hparams` (a mapping or an instance) validated as this method's `Hparams`; errors name
        `methods.<name>.<key>`."""
        if isinstance(hparams, cls.Hparams):
            return hparams
        if isinstance(hparams, MethodHparams):
            hparams = hparams.model_dump()
        if hparams is not None and not isinstance(hparams, dict):
            raise ConfigError(f"{where or 'methods.' + cls.name}: expected a mapping of hyperparameters, got "
                              f"{hparams!r}")
        return validate(cls.Hparams, hparams or {}, where or f"methods.{cls.name}", unknown_word="hyperparameter")

    # -- to override ---------------------------------------------------------------
    def check_hparams(self) -> None:
        """Checks that need more than one field or the data; raise ConfigError('methods.<name>.<key>: ...')."""

    def training_loss(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def cluster_logits(self, images: torch.Tensor) -> torch.Tensor | list[torch.Tensor] | None:
        """Scores of the method's own clustering/classification head(s), or None (no head: the suite's
        k-means on the backbone features scores the clustering).

        One head: a [B, K] tensor. Several heads (IIC's main + over-clustering head, Self-Classifier's
        heads): a list of [B, K_i] tensors, one per head, the main head (K = the true classes) first
        where there is one; the evaluation scores every head, a K = classes head with one-to-one ACC,
        an over-clustering head (K > classes) with many-to-one ACC. Cluster = argmax of a head.
        """
        return None

    def probe_features(self, images: torch.Tensor) -> torch.Tensor:
        """The features the linear probe is trained on, [B, D]: the backbone's by default. A method whose
        paper probes elsewhere overrides it (UIC sec. 5.2 keeps its MLP head and probes its output)."""
        return self.backbone(images)

    def on_train_epoch_start(self, ctx: EpochContext) -> dict[str, float]:
        """Called before each epoch; returns values to log (e.g. a scheduled weight)."""
        return {}

    def after_optimizer_step(self, progress: float) -> None:
        """Called after each optimizer step; progress in [0, 1] over the whole run (EMA updates)."""

    def epoch_order(self, epoch: int, generator: torch.Generator) -> torch.Tensor | None:
        """The order in which to visit the pretraining set this epoch; None = a random permutation."""
        return None

    def stages(self, settings) -> list[Stage] | None:
        """The pretraining stages, each with its own budget; None = one stage with the method's resolved
        epochs, batch size, optimizer and views (`settings`: its MethodConfig). The record's `epochs` is the
        last stage's."""
        return None

    def set_stage(self, index: int) -> None:
        """Called before stage `index` trains (and before its optimizer is built): e.g. freeze the other
        stages' parameters so that the optimizer holds only this stage's."""
        self.stage = index

    stage: int = 0

    def monitored_backbone(self) -> nn.Module:
        """The network whose features the online kNN monitor follows while the current stage trains: the
        evaluated backbone, unless a stage trains another network (SSL++'s clustering stage)."""
        return self.backbone

    # -- helpers -------------------------------------------------------------------
    def config_error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"methods.{self.name}.{key}: {message}")

    def require(self, condition: bool, key: str, message: str) -> None:
        if not condition:
            raise self.config_error(key, message)

    @staticmethod
    def global_batch(x: torch.Tensor) -> torch.Tensor:
        """Concatenate `x` over all DDP ranks (gradients flow back to each rank's slice)."""
        return gather_cat(x)


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, batch_norm: bool = True,
                   last_bn: bool = False) -> nn.Sequential:
    """Linear-BN-ReLU blocks then a final Linear (the dissertation's 512 -> 128 projection head)."""
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


class WeightNormLinear(nn.Module):
    """A bias-free Linear layer with weight normalisation per output row (torch's weight_norm, dim 0): weight =
    g * v / ||v||, g initialised to 1 (the Self-Classifier reimplementation's heads, model.py L39-43, and CARP's
    prototypes, modules/carp_head.py L26-30); `learn_gain=False` keeps g fixed at 1 (CARP's norm_last_layer),
    so the rows are unit vectors. v starts with nn.Linear's default init; the parameter names follow torch's
    weight_norm (weight_g [out, 1], weight_v [out, in])."""

    def __init__(self, in_dim: int, out_dim: int, learn_gain: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=learn_gain)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight)
