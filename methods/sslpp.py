"""IIC clustering and SSL++ (Chen et al., IEEE TIP): IIC pseudo-labels decoupled from a proxy task.

IIC (Ji et al., 2019; SSL++ sec. IV-B, Eq. 1-2): a clustering network Phi ends in a
softmax over C clusters and maximises the mutual information between the cluster
assignments of two transformed copies of each image. Written by hand (no library
has it).

SSL++ (Fig. 2, Eq. 3-5) runs two decoupled stages in one run here:
  stage 1 (the first `stage1_fraction` of the epochs): train an IIC clustering model
    (its own copy of the backbone + cluster heads, C = 70 on CIFAR-10, Table XIII);
  stage 2: compute the pseudo-labels z_n = argmax Phi(x_n) of the whole pretraining
    set once (clean images), then train the representation model `self.backbone` with
    L = L_s + lambda * L_c (Eq. 5): L_s the Rotation proxy task (4-way CE over
    0/90/180/270 degrees, Gidaris et al.), L_c the CE of a separate linear head on the
    pseudo-labels; lambda = 0.05 for Rotation (sec. V-A.4, Fig. 6).
The evaluated backbone is the stage-2 representation model; the clustering metrics
use the stage-1 head. The LR schedule (warm-up + cosine) restarts at stage 2, as the
two models are trained separately in the paper.

Choices where the paper is silent (each documented at its hparam):
- IIC's sub-heads (IIC uses 5; `num_heads`): the loss is their mean; predictions use
  the sub-head with the lowest (running) IIC loss, IIC's unsupervised head selection.
- Eq. 3 and 4 share the input x_n, so L_c is applied to every rotated copy (the same
  batch feeds both heads); `pseudo_labels_upright_only` applies it to the 0-degree copies.
- The two IIC views are the suite's first two augmented views (the paper's "pairs of
  transformed samples"); IIC's Sobel input and sample repeats are not used. Stage 2 feeds
  the four rotations of the first view (RotNet's 4 copies per image).
- The clustering stage has its own optimizer (`clustering_optimizer`, default IIC's Adam
  lr 1e-4): IIC's gradient vanishes near the uniform start, where SGD stays stuck; the
  method's optimizer (SGD lr 0.1 for Rotation, Table II) trains stage 2.
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from methods import register_method
from methods.base import EpochContext, MethodHparams, SSLMethod, TrainBatch
from ssl_common.distributed import gather_cat
from ssl_common.typed import OptimizerConfig, validate_nested

EPS = sys.float_info.epsilon  # the clamp value of IIC's public code
CLUSTERING_OPTIMIZER = {"name": "adamw", "lr": 1.0e-4, "weight_decay": 0.0}  # IIC's Adam (SSL++ Table II)


def iic_loss(probs_a: torch.Tensor, probs_b: torch.Tensor, lamb: float = 1.0) -> torch.Tensor:
    """IIC's loss, minus the mutual information of the paired cluster assignments (SSL++ Eq. 2).

    P = (1/n) sum_i Phi(x_a^i) Phi(x_b^i)^T over the global batch (gathered under DDP,
    differentiably), symmetrised (P + P^T) / 2 and normalised to sum 1; Pi, Pj its row and
    column marginals;  loss = -sum_cc' P_cc' (log P_cc' - lamb log Pi_c - lamb log Pj_c').
    At lamb = 1 this is -I(z, z') (Eq. 2); lamb > 1 (IIC's public code) favours balanced
    clusters more strongly. P and the marginals are clamped at EPS before the log, out of
    place (IIC's public code clamps P in place, which also changes the multiplier P).
    Computed in float32 at least, also under mixed precision.
    """
    if probs_a.shape != probs_b.shape or probs_a.dim() != 2:
        raise ValueError(f"iic_loss expects two [N, C] probability matrices, got {tuple(probs_a.shape)} "
                         f"and {tuple(probs_b.shape)}")
    with torch.autocast(probs_a.device.type, enabled=False):
        dtype = torch.promote_types(probs_a.dtype, torch.float32)  # float32 at least (bf16/fp16 inputs)
        probs_a, probs_b = gather_cat(probs_a.to(dtype)), gather_cat(probs_b.to(dtype))
        joint = probs_a.t() @ probs_b / probs_a.shape[0]  # [C, C]
        joint = (joint + joint.t()) / 2
        joint = joint / joint.sum()
        p_i = joint.sum(dim=1, keepdim=True)  # [C, 1] marginal of z
        p_j = joint.sum(dim=0, keepdim=True)  # [1, C] marginal of z'
        log_ratio = (torch.log(joint.clamp(min=EPS)) - lamb * torch.log(p_i.clamp(min=EPS))
                     - lamb * torch.log(p_j.clamp(min=EPS)))
        return -(joint * log_ratio).sum()


class ClusterHeads(nn.Module):
    """IIC's sub-heads: each a linear layer to C clusters (softmax applied by the loss user).

    `head_loss` keeps a running mean of each sub-head's IIC loss (a buffer: saved in
    checkpoints); `best` is the sub-head with the lowest one, used for predictions.
    """

    def __init__(self, in_dim: int, num_clusters: int, num_heads: int, loss_momentum: float = 0.9):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(in_dim, num_clusters) for _ in range(num_heads))
        self.loss_momentum = loss_momentum
        self.register_buffer("head_loss", torch.full((num_heads,), float("nan")))

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:
        return [head(features) for head in self.heads]

    @torch.no_grad()
    def record_losses(self, losses: torch.Tensor) -> None:
        losses = losses.detach().to(self.head_loss)
        fresh = torch.isnan(self.head_loss)
        blended = self.loss_momentum * self.head_loss + (1 - self.loss_momentum) * losses
        self.head_loss.copy_(torch.where(fresh, losses, blended))

    @property
    def best(self) -> int:
        if torch.isnan(self.head_loss).all():
            return 0
        return int(torch.nan_to_num(self.head_loss, nan=float("inf")).argmin())

    def best_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.heads[self.best](features)


def clustering_loss(backbone: nn.Module, heads: ClusterHeads, views: list[torch.Tensor], lamb: float
                    ) -> tuple[torch.Tensor, dict]:
    """The mean IIC loss of the sub-heads between the first two views (records each head's loss)."""
    if len(views) < 2:
        raise ValueError("IIC needs two augmented views per image; give augment.views count >= 2")
    logits_a, logits_b = heads(backbone(views[0])), heads(backbone(views[1]))
    losses = torch.stack([iic_loss(F.softmax(a, dim=1), F.softmax(b, dim=1), lamb)
                          for a, b in zip(logits_a, logits_b)])
    heads.record_losses(losses)
    return losses.mean(), {"iic_best_head_loss": losses.detach().min()}


class ClusteringModel(nn.Module):
    """SSL++'s stage-1 model Phi: its own backbone and IIC sub-heads."""

    def __init__(self, backbone: nn.Module, num_clusters: int, num_heads: int, lamb: float):
        super().__init__()
        self.backbone = backbone
        self.heads = ClusterHeads(backbone.feature_dim, num_clusters, num_heads)
        self.lamb = lamb

    def loss(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        return clustering_loss(self.backbone, self.heads, views, self.lamb)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Scores of the best sub-head [B, C]."""
        return self.heads.best_logits(self.backbone(images))


class IICHparams(MethodHparams):
    num_clusters: int = Field(70, ge=2)  # over-clustering: SSL++ uses 70 on CIFAR-10 (Table XIII)
    num_heads: int = Field(5, ge=1)  # IIC's sub-heads
    iic_lamb: float = Field(1.0, gt=0)  # 1 = the paper's mutual information (Eq. 2)


@register_method("iic")
class IIC(SSLMethod):
    """The IIC clustering model alone (SSL++'s stage 1 as a method of its own)."""

    display_name = "IIC"
    paper = "sslpp"
    Hparams = IICHparams

    def __init__(self, backbone, data, hparams=None):
        super().__init__(backbone, data, hparams)
        hp = self.hparams
        self.heads = ClusterHeads(backbone.feature_dim, hp.num_clusters, hp.num_heads)

    def training_loss(self, batch: TrainBatch):
        return clustering_loss(self.backbone, self.heads, batch.views, self.hparams.iic_lamb)

    @torch.no_grad()
    def cluster_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.heads.best_logits(self.backbone(images))


# -- SSL++ stage 2: the Rotation proxy task -----------------------------------------------------

def rotation_batch(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RotNet's input: the four copies rot90(x, k), k = 0..3 (0/90/180/270 degrees), stacked
    k-major ([4B, C, H, W]), and their rotation labels k ([4B])."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"the Rotation task needs square images, got {tuple(images.shape[-2:])}")
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])
    labels = torch.arange(4, device=images.device).repeat_interleave(images.shape[0])
    return rotated, labels


def random_rotation_batch(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One random quarter turn k per image ([B, C, H, W], labels k [B]): RotNet's task at a quarter of
    its cost (the `rotation_copies: 1` variant)."""
    k = torch.randint(4, (images.shape[0],), generator=generator, device=generator.device).to(images.device)
    every = torch.stack([torch.rot90(images, r, dims=(2, 3)) for r in range(4)])  # [4, B, C, H, W]
    return every[k, torch.arange(images.shape[0], device=images.device)], k


def sslpp_loss(rotation_logits: torch.Tensor, rotation_labels: torch.Tensor, pseudo_logits: torch.Tensor,
               pseudo_labels: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 5: L = L_s + lambda * L_c with L_s the rotation CE (Eq. 3) and L_c the CE on the
    clustering pseudo-labels (Eq. 4). Returns (L, L_s, L_c)."""
    loss_s = F.cross_entropy(rotation_logits, rotation_labels)
    loss_c = F.cross_entropy(pseudo_logits, pseudo_labels)
    return loss_s + weight * loss_c, loss_s, loss_c


def normalized_mutual_info(labels_true: torch.Tensor, labels_pred: torch.Tensor) -> float:
    """NMI (arithmetic normalisation, scikit-learn) over the labelled entries (label >= 0)."""
    from sklearn.metrics import normalized_mutual_info_score

    keep = labels_true >= 0
    return float(normalized_mutual_info_score(labels_true[keep].cpu().numpy(), labels_pred[keep].cpu().numpy()))


@register_method("sslpp")
class SSLPlusPlus(SSLMethod):
    display_name = "SSL++ (Rotation)"
    paper = "sslpp"
    # each stage trains only its own model: DDP must allow parameters without gradients
    has_unused_parameters = True

    class Hparams(IICHparams):
        # num_clusters: C of the clustering model (Table XIII: 70 on CIFAR-10); num_heads: IIC's sub-heads
        stage1_fraction: float = 0.5  # share of the run's epochs spent on the clustering stage
        pseudo_label_weight: float = Field(0.05, ge=0)  # lambda of Eq. 5 (0.05 Rotation/AET, 1 Colorization/Context)
        pseudo_labels_upright_only: bool = False  # L_c on the 0-degree copies only (default: all copies)
        # 4: the four rotations of the first view (RotNet, the paper); 1: one random rotation of each
        # view (half the cost with two views)
        rotation_copies: Literal[1, 4] = 4
        # the stage-1 model's optimizer (overrides of the method's optimizer, which trains stage 2):
        # IIC's Adam, lr 1e-4 (SGD leaves IIC at the uniform solution, where its gradient vanishes);
        # a partial mapping overrides single keys of this default
        clustering_optimizer: dict[str, Any] = Field(default_factory=lambda: dict(CLUSTERING_OPTIMIZER))

        @field_validator("stage1_fraction")
        @classmethod
        def _fraction(cls, value: float) -> float:
            if not 0 < value < 1:
                raise ValueError(f"must be in (0, 1), got {value}")
            return value

        @field_validator("clustering_optimizer")
        @classmethod
        def _optimizer(cls, value: dict[str, Any]) -> dict[str, Any]:
            merged = {**CLUSTERING_OPTIMIZER, **value}
            validate_nested(OptimizerConfig, merged)  # the error names clustering_optimizer.<key>
            return merged

    def __init__(self, backbone, data, hparams=None):
        super().__init__(backbone, data, hparams)
        hp = self.hparams
        # stage 1: its own copy of the backbone (starts from the same random weights)
        self.clustering = ClusteringModel(copy.deepcopy(backbone), hp.num_clusters, hp.num_heads, hp.iic_lamb)
        # stage 2: V1 (rotation) and V2 (pseudo-labels) on the representation model f_theta
        self.rotation_head = nn.Linear(backbone.feature_dim, 4)
        self.pseudo_label_head = nn.Linear(backbone.feature_dim, hp.num_clusters)
        self.register_buffer("pseudo_labels", torch.full((data.num_train,), -1, dtype=torch.long))

    def check_hparams(self):
        hp = self.hparams
        self.require(not (hp.pseudo_labels_upright_only and hp.rotation_copies == 1), "pseudo_labels_upright_only",
                     "needs rotation_copies: 4 (with one random rotation a batch may have no upright copy)")

    def stage1_epochs(self, max_epochs: int) -> int:
        """Epochs of the clustering stage: the fraction rounded, leaving each stage >= 1 epoch."""
        return min(max(1, round(self.hparams.stage1_fraction * max_epochs)), max(0, max_epochs - 1))

    def schedule_restarts(self, max_epochs: int) -> list[int]:
        return [self.stage1_epochs(max_epochs)]

    def optimizer_groups(self):
        return [(list(self.clustering.parameters()), self.hparams.clustering_optimizer)]

    def _stage2_modules(self) -> list[nn.Module]:
        return [self.backbone, self.rotation_head, self.pseudo_label_head]

    def on_train_epoch_start(self, ctx: EpochContext) -> dict[str, float]:
        stage2 = ctx.epoch >= self.stage1_epochs(ctx.max_epochs)
        # only the current stage's model trains; the other one gets no gradients (so no update,
        # weight decay or momentum either: optimizers skip parameters whose grad is None)
        self.clustering.requires_grad_(not stage2)
        for module in self._stage2_modules():
            module.requires_grad_(stage2)
        logs = {"stage": 2.0 if stage2 else 1.0}
        if stage2 and bool((self.pseudo_labels < 0).any()):  # first stage-2 epoch (also after a resume)
            labels = ctx.predict(self.clustering).argmax(dim=1)
            self.pseudo_labels.copy_(labels.to(self.pseudo_labels.device))
            logs["pseudo_label_clusters"] = float(torch.unique(labels).numel())
            if ctx.labels is not None and bool((ctx.labels >= 0).any()):
                logs["pseudo_label_nmi"] = normalized_mutual_info(ctx.labels, labels)
        return logs

    def training_loss(self, batch: TrainBatch):
        if batch.epoch < self.stage1_epochs(batch.max_epochs):
            return self.clustering.loss(batch.views)
        if bool((self.pseudo_labels < 0).any()):
            raise RuntimeError("SSL++ stage 2 needs the stage-1 pseudo-labels (computed at the epoch start)")
        targets = self.pseudo_labels[batch.indices.to(self.pseudo_labels.device)]
        if self.hparams.rotation_copies == 4:  # RotNet's input: the four rotated copies of one view
            rotated, rotation_labels = rotation_batch(batch.views[0])
        else:
            pairs = [random_rotation_batch(view, batch.generator) for view in batch.views]
            rotated, rotation_labels = torch.cat([r for r, _ in pairs]), torch.cat([k for _, k in pairs])
        features = self.backbone(rotated)
        upright = rotation_labels == 0
        pseudo_features = features[upright] if self.hparams.pseudo_labels_upright_only else features
        pseudo_targets = targets.repeat(len(features) // len(targets))  # copies are stacked image-minor
        pseudo_targets = pseudo_targets[upright] if self.hparams.pseudo_labels_upright_only else pseudo_targets
        loss, loss_s, loss_c = sslpp_loss(self.rotation_head(features), rotation_labels,
                                          self.pseudo_label_head(pseudo_features), pseudo_targets,
                                          self.hparams.pseudo_label_weight)
        return loss, {"rotation_loss": loss_s.detach(), "pseudo_label_loss": loss_c.detach()}

    @torch.no_grad()
    def cluster_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.clustering(images)
