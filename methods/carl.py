"""CARL, Consistent Assignment for Representation Learning (Silva, dissertation ch. 5).

Paper: ../shared/seeds/carl-carp-dissertation.txt, Eq. 5.2-5.8 and Listing 2.

    q_i = <z_i, c_j>_j                  prototype scores, a linear "assigner"       (Eq. 5.2)
    p_i = softmax(q_i)                                                             (Eq. 5.3)
    L_c = 0.5 * -mean_i log <p_i^a, sg(p_i^b)> + 0.5 * -mean_i log <p_i^b, sg(p_i^a)>
                                       Eq. 5.4, symmetrised with the stop-gradient of Listing 2
    KL(P || U) = log K + sum_c pbar_c log pbar_c,  pbar = mean_i p_i       (Eq. 5.5-5.6)
    L = L_c + lambda_e * (KL(P^a || U) + KL(P^b || U))    (Eq. 5.7; views summed as in Listing 2)
    lambda_e = b - (b - a) e / E for e <= E, then a                                (Eq. 5.8)

Choices: the KL is Eq. 5.5 (Listing 2's `kl_div` returns the entropy, whose sign is
wrong for a term added to the loss: minimising it would collapse the assignments).
The dot product is clamped at 1e-7 before the log. Under DDP the scores are gathered
first, so pbar (and the whole loss) is the one of the global batch.

Settings (dissertation sec. 5.6, 5.8; the suites' carl sections):

| setting          | paper                                                          | suite                        |
|------------------|----------------------------------------------------------------|------------------------------|
| K                | 100 CIFAR-10, 300 CIFAR-100 / STL-10 (sec. 5.8.4)              | the same                     |
| lambda_e         | 4 -> 1.5 over 100 epochs CIFAR (sec. 5.6.2); 2 -> 1 STL-10     | the same (digits/mnist:      |
|                  | (sec. 5.6.1), per epoch (Eq. 5.8; Listing 2 per iteration)     | shorter, see the suite files)|
| projection head  | 512 -> 512 -> 128 with BN (sec. 5.8.2)                         | the same                     |
| optimizer        | SGD 0.6 -> 0.0006 cosine, wd 5e-4 ("LARS ... but pure SGD      | SGD 0.6 -> 0.0006, wd 5e-4   |
|                  | produces similar results"), momentum not stated (sec. 5.8.4)   | momentum 0.9                 |
| batch / epochs   | 256 / 200, ResNet-18 (sec. 5.8)                                | the suite's                  |
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from methods import register_method
from methods.base import MethodHparams, SSLMethod, TrainBatch, projection_mlp
from ssl_common.distributed import gather_cat

DOT_EPS = 1e-7


def consistency_term(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-mean log <p, sg(t)> over every leading index (Eq. 5.4 / 6.5); the last dim holds the classes."""
    dot = (probs * targets.detach()).sum(dim=-1)
    return -torch.log(dot.clamp_min(DOT_EPS)).mean()


def kl_to_uniform(probs: torch.Tensor) -> torch.Tensor:
    """KL(mean_batch p || uniform) = log K + sum pbar log pbar (Eq. 5.5-5.6).

    probs: [N, K], or [N, n_blocks, N_B] for CARP's blocks (KL per block over its N_B
    classes, then the mean over blocks).
    """
    mean = probs.mean(dim=0)
    kl = math.log(mean.shape[-1]) + torch.xlogy(mean, mean).sum(dim=-1)
    return kl.mean()


def assignment_terms(probs_a: torch.Tensor, probs_b: torch.Tensor, targets_a: torch.Tensor | None = None,
                     targets_b: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(symmetrised consistency, KL of view a + KL of view b) on a global batch.

    Targets default to the other view's own probabilities (CARL); CARP's EMA teacher passes its own.
    """
    targets_a = probs_a if targets_a is None else targets_a
    targets_b = probs_b if targets_b is None else targets_b
    consistency = 0.5 * consistency_term(probs_a, targets_b) + 0.5 * consistency_term(probs_b, targets_a)
    kl = kl_to_uniform(probs_a) + kl_to_uniform(probs_b)
    return consistency, kl


def carl_terms(scores_a: torch.Tensor, scores_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_c, KL^a + KL^b) from the prototype scores [N, K] of two views, over the global batch."""
    probs_a, probs_b = (F.softmax(gather_cat(s), dim=1) for s in (scores_a, scores_b))
    return assignment_terms(probs_a, probs_b)


def carl_loss(scores_a: torch.Tensor, scores_b: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """Eq. 5.7 on the prototype scores [N, K] of two views (the global batch under DDP)."""
    consistency, kl = carl_terms(scores_a, scores_b)
    return consistency + kl_weight * kl


def kl_weight_schedule(epoch: int, start: float, end: float, decay_epochs: int) -> float:
    """lambda_e of Eq. 5.8: linear from b = start to a = end over the first E epochs, then a."""
    if epoch <= decay_epochs and decay_epochs > 0:
        return start - (start - end) / decay_epochs * epoch
    return end


class AssignmentHparams(MethodHparams):
    """What CARL and CARP share: the prototype count, projection head and lambda_e schedule (Eq. 5.8)."""

    num_prototypes: int = Field(100, ge=2)  # K
    hidden_dim: int = Field(512, ge=1)  # projection head 512 -> 128 with BN (sec. 5.8.2)
    output_dim: int = Field(128, ge=1)
    kl_weight_start: float = Field(4.0, ge=0)  # b of Eq. 5.8
    kl_weight_end: float = Field(1.5, ge=0)  # a
    kl_decay_epochs: int = Field(100, ge=0)  # E


class AssignmentMethod(SSLMethod):
    """What CARL and CARP share: projection head, scheduled KL weight."""

    Hparams = AssignmentHparams

    def __init__(self, backbone, data, hparams=None):
        super().__init__(backbone, data, hparams)
        hp = self.hparams
        self.projection_head = projection_mlp(backbone.feature_dim, hp.hidden_dim, hp.output_dim)

    def kl_weight(self, epoch: int) -> float:
        hp = self.hparams
        return kl_weight_schedule(epoch, hp.kl_weight_start, hp.kl_weight_end, hp.kl_decay_epochs)

    def on_train_epoch_start(self, ctx):
        return {"kl_weight": self.kl_weight(ctx.epoch)}


@register_method("carl")
class CARL(AssignmentMethod):
    display_name = "CARL"
    paper = "carl-carp-dissertation"

    class Hparams(AssignmentHparams):
        num_prototypes: int = Field(100, ge=2)  # K: 100 on CIFAR-10, 300 on CIFAR-100/STL-10 (sec. 5.8.4)
        # b, a, E of Eq. 5.8: 4 -> 1.5 over 100 epochs on CIFAR (sec. 5.6.2)

    def __init__(self, backbone, data, hparams=None):
        super().__init__(backbone, data, hparams)
        hp = self.hparams
        self.assigner = nn.Linear(hp.output_dim, hp.num_prototypes, bias=False)  # prototypes c_j (Eq. 5.2)

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.assigner(self.projection_head(self.backbone(x)))

    def training_loss(self, batch: TrainBatch):
        consistency, kl = carl_terms(*(self._scores(v) for v in batch.views[:2]))
        loss = consistency + self.kl_weight(batch.epoch) * kl
        return loss, {"consistency": consistency.detach(), "kl": kl.detach()}

    @torch.no_grad()
    def cluster_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self._scores(images)
