"""IIC, Invariant Information Clustering (Ji et al., ICCV 2019), as SSL++ uses it (sslpp.txt sec. IV-B).

A clustering network Phi ends in a softmax over C clusters and maximises the mutual information
between the cluster assignments of paired views x, x' of each image (SSL++ Eq. 1-2):

    P = 1/n sum_i Phi(x_i) Phi(x'_i)^T,  symmetrised (P + P^T) / 2,  I(z, z') = sum P log(P / (Pi Pj))

Written by hand (no library has it). What follows IIC's paper and public code (xu-ji/IIC, the
CIFAR-10 run `cluster_sobel_twohead`, examples/commands.txt):

| setting              | IIC (paper / code)                                        | here                              |
|----------------------|-----------------------------------------------------------|-----------------------------------|
| heads                | main head B, K = the true classes, and an over-clustering | `main_head` + `num_clusters` (70) |
|                      | head A (70 on CIFAR-10; 140 CIFAR-100-20), 5 sub-heads    | `num_heads` sub-heads each (5)    |
|                      | each (IIC sec. 3.3 "auxiliary over-clustering")           |                                   |
| alternation          | per outer epoch head A 1 epoch, then head B 2 epochs      | `overcluster_epochs` 1,           |
|                      | (`--head_A_first --head_B_epochs 2`), one shared trunk    | `main_epochs` 2, A first          |
| sub-head loss        | the mean over the sub-heads of IID_loss (lamb 1)          | the same                          |
| sub-head for eval    | best on the labelled set (IIC's default)                  | lowest running loss (unsupervised)|
| input                | grey -> Sobel dx/dy, 2 channels (sobel_process)           | `sobel` (see below)               |
| views                | tf1 = crop 20 -> resize 32 -> grey; tf2 = crop + flip +   | the method's `augment` block:     |
|                      | jitter(0.4, 0.4, 0.4, 0.125) -> grey; each tf1 paired     | view 0 = weak, views 1.. = strong |
|                      | with 3 strong copies (660 pairs from 220 images)          | (count r: r pairs per image)      |
| optimizer            | Adam lr 1e-4, no schedule; 2000 epochs                    | the suite's iic section           |
| loss clamp           | P < eps set to eps in place (sys.float_info.epsilon)      | out of place, see `iic_loss`      |

SSL++ Table XIV: the clustering model's weak view = crop + grey + Sobel, strong = crop + flip + colour
jitter + grey + Sobel (its best pseudo-labels, 54.4% cluster accuracy); Table XIII fixes C = 70.

Views: the loss pairs view 0 (weak) with every later view (strong), all pairs in one joint P, as IIC's
code pairs each tf1 image with its `num_dataloaders` tf2 copies. With the suites' usual two symmetric
views it is the plain pair (view 0, view 1).

Sobel (`sobel: true`): a fixed first step of the clustering network -- the image (grey: the luma of
the, normalised, RGB channels, or the single channel) goes through IIC's 3x3 Sobel kernels dx, dy with
zero padding, and the backbone, built with a 2-channel input conv, sees [dx, dy]. The backbone module
(`SobelInput`) still takes the suite's images, so evaluation, the kNN monitor and per-stage probes work
unchanged. Normalisation happens before the grey conversion; the Sobel kernels sum to 0, so the mean
offset cancels and only the channels' std scale remains (about equal across channels).

`cluster_logits` returns [main head, over-clustering head] (the main head first), each the sub-head
with the lowest running loss; with `main_head: false`, the over-clustering head alone.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from methods import register_method
from methods.base import MethodHparams, SSLMethod, TrainBatch
from ssl_common.distributed import gather_cat

EPS = sys.float_info.epsilon  # the clamp value of IIC's public code


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
        joint = probs_a.t() @ probs_b / probs_a.shape[0]  # [C, C]                      (Eq. 1)
        joint = (joint + joint.t()) / 2
        joint = joint / joint.sum()
        p_i = joint.sum(dim=1, keepdim=True)  # [C, 1] marginal of z
        p_j = joint.sum(dim=0, keepdim=True)  # [1, C] marginal of z'
        log_ratio = (torch.log(joint.clamp(min=EPS)) - lamb * torch.log(p_i.clamp(min=EPS))
                     - lamb * torch.log(p_j.clamp(min=EPS)))
        return -(joint * log_ratio).sum()  # (Eq. 2)


# -- Sobel input ------------------------------------------------------------------------------------------

# IIC's sobel_process (utils/cluster/general.py): dx and dy, cross-correlation as nn.Conv2d, padding 1
SOBEL_KERNELS = torch.tensor([[[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]],
                              [[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]]]).unsqueeze(1)  # [2, 1, 3, 3]


def sobel_filter(images: torch.Tensor) -> torch.Tensor:
    """[B, 1 or 3, H, W] -> [B, 2, H, W]: grey (ITU-R 601 luma of RGB, as torchvision's Grayscale) then IIC's
    Sobel dx, dy with zero padding."""
    if images.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype)
        grey = (images * weights.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    elif images.shape[1] == 1:
        grey = images
    else:
        raise ValueError(f"the Sobel input takes 1- or 3-channel images, got {images.shape[1]} channels")
    return F.conv2d(grey, SOBEL_KERNELS.to(images.device, images.dtype), padding=1)


def with_input_channels(backbone: nn.Module, channels: int) -> nn.Module:
    """A copy of `backbone` whose input convolution (its first nn.Conv2d, in registration order: the input
    conv of every suite backbone) takes `channels` channels; freshly initialised, the rest unchanged."""
    backbone = copy.deepcopy(backbone)
    for module in backbone.modules():
        for name, child in module.named_children():
            if isinstance(child, nn.Conv2d):
                conv = nn.Conv2d(channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                                 child.dilation, child.groups, child.bias is not None, child.padding_mode)
                setattr(module, name, conv)
                if hasattr(backbone, "in_channels"):
                    backbone.in_channels = channels
                return backbone
    raise ValueError(f"{type(backbone).__name__} has no nn.Conv2d to take the {channels}-channel Sobel input")


class SobelInput(nn.Module):
    """IIC's clustering trunk on Sobel input: takes the suite's images, feeds [dx, dy] to a 2-channel copy of
    the backbone. Exposes the backbone interface (feature_dim, forward_stages, pooled_stages)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.net = with_input_channels(backbone, 2)
        self.feature_dim = backbone.feature_dim
        self.stage_dims = list(getattr(backbone, "stage_dims", [backbone.feature_dim]))
        self.in_channels = getattr(backbone, "in_channels", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(sobel_filter(x))

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net.forward_stages(sobel_filter(x))

    def pooled_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net.pooled_stages(sobel_filter(x))


# -- heads ------------------------------------------------------------------------------------------------

class ClusterHeads(nn.Module):
    """One IIC head: `num_heads` sub-heads, each a linear layer to C clusters (softmax applied by the loss user).

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

    def loss(self, features_a: torch.Tensor, features_b: torch.Tensor, lamb: float) -> torch.Tensor:
        """The mean IIC loss of the sub-heads between paired features (records each sub-head's loss)."""
        losses = torch.stack([iic_loss(F.softmax(a, dim=1), F.softmax(b, dim=1), lamb)
                              for a, b in zip(self(features_a), self(features_b))])
        self.record_losses(losses)
        return losses.mean()


class IICHparams(MethodHparams):
    num_clusters: int = Field(70, ge=2)  # C of the over-clustering head (IIC CIFAR-10 / SSL++ Table XIII: 70)
    main_head: bool = True  # IIC's main head with K = the true classes, trained in alternation with it
    num_heads: int = Field(5, ge=1)  # sub-heads per head (IIC: 5)
    iic_lamb: float = Field(1.0, gt=0)  # 1 = the paper's mutual information (Eq. 2)
    sobel: bool = False  # grey -> Sobel dx/dy input, a 2-channel backbone (IIC; SSL++ Table XIV)
    overcluster_epochs: int = Field(1, ge=1)  # epochs of the over-clustering head per cycle (IIC CIFAR-10: 1)
    main_epochs: int = Field(2, ge=1)  # epochs of the main head per cycle (IIC CIFAR-10: --head_B_epochs 2)
    overcluster_first: bool = True  # IIC CIFAR-10: --head_A_first


class IICHeads(nn.Module):
    """IIC's two heads on a shared trunk: the over-clustering head and, optionally, the main head (K = the
    true classes), trained in alternation, one head per epoch."""

    def __init__(self, in_dim: int, num_classes: int, hp: IICHparams):
        super().__init__()
        self.hp = hp
        self.overcluster = ClusterHeads(in_dim, hp.num_clusters, hp.num_heads)
        self.main = ClusterHeads(in_dim, num_classes, hp.num_heads) if hp.main_head else None

    def active(self, epoch: int) -> str:
        """The head trained in `epoch`: cycles of `overcluster_epochs` + `main_epochs` epochs."""
        hp = self.hp
        if self.main is None:
            return "overcluster"
        first, second = ("overcluster", "main") if hp.overcluster_first else ("main", "overcluster")
        first_epochs = hp.overcluster_epochs if hp.overcluster_first else hp.main_epochs
        return first if epoch % (hp.overcluster_epochs + hp.main_epochs) < first_epochs else second

    def loss(self, features_a: torch.Tensor, features_b: torch.Tensor, epoch: int) -> tuple[torch.Tensor, dict]:
        name = self.active(epoch)
        head = self.overcluster if name == "overcluster" else self.main
        loss = head.loss(features_a, features_b, self.hp.iic_lamb)
        return loss, {"iic_overcluster_head": float(name == "overcluster"),
                      "iic_best_head_loss": head.head_loss[head.best].detach()}

    def logits(self, features: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        over = self.overcluster.best_logits(features)
        return over if self.main is None else [self.main.best_logits(features), over]


def paired_views(views: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(weak view, strong views): view 0 is paired with every later view (IIC's tf1 with its tf2 copies)."""
    if len(views) < 2:
        raise ValueError("IIC needs two or more augmented views per image (a weak view, then strong ones); "
                         "give augment.views counts summing to >= 2")
    return views[0], list(views[1:])


def iic_heads_loss(trunk: nn.Module, heads: IICHeads, views: list[torch.Tensor], epoch: int
                   ) -> tuple[torch.Tensor, dict]:
    """IIC's loss on the pairs (weak, strong_k), all in one joint P; the weak view is forwarded once and its
    features repeated (the same as IIC forwarding the repeated tf1 images: BN statistics of repeated copies
    are those of one copy)."""
    weak, strong = paired_views(views)
    features_weak = trunk(weak).repeat(len(strong), 1)
    features_strong = trunk(torch.cat(strong))
    return heads.loss(features_weak, features_strong, epoch)


class ClusteringModel(nn.Module):
    """IIC's clustering network Phi: its trunk (Sobel input when asked) and its heads."""

    def __init__(self, backbone: nn.Module, num_classes: int, hp: IICHparams):
        super().__init__()
        self.backbone = SobelInput(backbone) if hp.sobel else backbone
        self.heads = IICHeads(self.backbone.feature_dim, num_classes, hp)

    def loss(self, views: list[torch.Tensor], epoch: int) -> tuple[torch.Tensor, dict]:
        return iic_heads_loss(self.backbone, self.heads, views, epoch)

    def forward(self, images: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Scores of each head's best sub-head: [main, over-clustering] (or over-clustering alone)."""
        return self.heads.logits(self.backbone(images))

    def overcluster_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.heads.overcluster.best_logits(self.backbone(images))


@register_method("iic")
class IIC(SSLMethod):
    """The IIC clustering model alone (SSL++'s stage 1 as a method of its own)."""

    display_name = "IIC"
    paper = "sslpp"
    version = 2  # v2: main + over-clustering heads, Sobel option, weak/strong pairing
    Hparams = IICHparams
    has_unused_parameters = True  # one head trains per epoch: the other gets no gradient

    def __init__(self, backbone, data, hparams=None):
        super().__init__(backbone, data, hparams)
        hp = self.hparams
        if hp.sobel:
            self.backbone = SobelInput(backbone)
        self.heads = IICHeads(self.backbone.feature_dim, data.num_classes, hp)

    def check_hparams(self):
        self.require(not self.hparams.main_head or self.data.num_classes >= 2, "main_head",
                     "needs at least 2 true classes")

    def training_loss(self, batch: TrainBatch):
        return iic_heads_loss(self.backbone, self.heads, batch.views, batch.epoch)

    @torch.no_grad()
    def cluster_logits(self, images: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.heads.logits(self.backbone(images))
