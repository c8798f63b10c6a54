"""CARP, Consistent Assignment of Random Partition Sets (Silva, dissertation ch. 6).

Paper: ../shared/seeds/carl-carp-dissertation.txt, Eq. 6.1-6.9, sec. 6.5.4.

CARL (methods/carl.py) done block-wise: every iteration the K prototypes are split by
a fresh random partition into N_P = K / N_B blocks of N_B prototypes (Eq. 6.2), and
for view i and block j

    p_{i,j} = softmax(scores_i[block_j])              softmax over the block only (Eq. 6.3-6.4)
    L_c  = -1/(B N_P) sum_i sum_j log <p^a_{i,j}, sg(p^b_{i,j})>, symmetrised as CARL      (Eq. 6.5)
    L_KL = 1/N_P sum_j (log N_B + sum_c pbar_{j,c} log pbar_{j,c}), pbar_j = mean_i p_{i,j}
                                                                           (Eq. 6.6-6.7)
    L    = L_c + lambda_e * (L_KL^a + L_KL^b)           (Eq. 6.9, lambda_e of Eq. 5.8)

Choices: Eq. 6.6 writes a single log K and a sum over blocks; we use the uniform
distribution of each block (log N_B) and the mean over blocks, as the official code
does (a constant and a scale of lambda). The partition is drawn from the step's seeded
generator (TrainBatch.generator, seeded by (seed, step)), so it survives resume and is
the same on every DDP rank. The assigner is a two-layer MLP with BN (sec. 6.2, 6.5.2),
its last layer holding the prototypes without bias (Eq. 6.3). The later official code's
EMA teacher (targets from an EMA copy of backbone + heads) is the flag `ema_teacher`,
off by default; multi-crop is not implemented.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from pydantic import Field
from torch import nn

from methods import register_method
from methods.base import TrainBatch
from methods.carl import AssignmentHparams, AssignmentMethod, assignment_terms
from ssl_common.distributed import gather_cat


def random_partition(num_prototypes: int, block_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random partition of range(num_prototypes) into blocks of `block_size`: LongTensor [n_blocks, block_size]."""
    if block_size < 1 or num_prototypes < 1 or num_prototypes % block_size != 0:
        raise ValueError(f"random_partition: the block size ({block_size}) must divide the number of "
                         f"prototypes ({num_prototypes}) so that every block has the same size")
    device = generator.device if generator is not None else torch.device("cpu")
    order = torch.randperm(num_prototypes, generator=generator, device=device)
    return order.view(num_prototypes // block_size, block_size)


def block_probs(scores: torch.Tensor, partition: torch.Tensor) -> torch.Tensor:
    """[N, K] scores -> [N, n_blocks, N_B] probabilities, a softmax within each block (Eq. 6.4)."""
    return F.softmax(scores[:, partition.to(scores.device)], dim=-1)


def carp_terms(scores_a: torch.Tensor, scores_b: torch.Tensor, partition: torch.Tensor,
               target_scores_a: torch.Tensor | None = None,
               target_scores_b: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_c, L_KL^a + L_KL^b) over the global batch; targets from a teacher if given, else the other view."""
    probs_a, probs_b = (block_probs(gather_cat(s), partition) for s in (scores_a, scores_b))
    targets_a = targets_b = None
    if target_scores_a is not None:
        targets_a, targets_b = (block_probs(gather_cat(s.detach()), partition)
                                for s in (target_scores_a, target_scores_b))
    return assignment_terms(probs_a, probs_b, targets_a, targets_b)


def carp_loss(scores_a: torch.Tensor, scores_b: torch.Tensor, partition: torch.Tensor,
              kl_weight: float) -> torch.Tensor:
    """Eq. 6.9 on the prototype scores [N, K] of two views for one partition [n_blocks, N_B]."""
    consistency, kl = carp_terms(scores_a, scores_b, partition)
    return consistency + kl_weight * kl


@register_method("carp")
class CARP(AssignmentMethod):
    display_name = "CARP"
    paper = "carl-carp-dissertation"

    class Hparams(AssignmentHparams):
        num_prototypes: int = Field(300, ge=2)  # K (ImageNet: 3000)
        block_size: int = Field(30, ge=2)  # N_B (ImageNet: 250, N_P = 12)
        # projection head 512 -> 128 (as CARL on CIFAR)
        assigner_hidden_dim: int = Field(512, ge=1)  # two-layer assigner with BN, as wide as the projection head (sec. 6.5.2)
        kl_weight_start: float = Field(2.0, ge=0)  # lambda_e: 2.0 -> 0.15 over the first 30 epochs (sec. 6.5.4)
        kl_weight_end: float = Field(0.15, ge=0)
        kl_decay_epochs: int = Field(30, ge=0)
        ema_teacher: bool = False  # later official code: targets from an EMA teacher
        ema_momentum_base: float = Field(0.99, ge=0, le=1)  # teacher momentum, cosine schedule to 1 (as BYOL)

    def __init__(self, backbone, data, hparams=None):
        super().__init__(backbone, data, hparams)
        hp = self.hparams
        self.assigner = nn.Sequential(
            nn.Linear(hp.output_dim, hp.assigner_hidden_dim, bias=False),
            nn.BatchNorm1d(hp.assigner_hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hp.assigner_hidden_dim, hp.num_prototypes, bias=False),  # prototypes (Eq. 6.3)
        )
        if hp.ema_teacher:
            self.teacher = nn.ModuleDict({"backbone": copy.deepcopy(backbone),
                                          "projection_head": copy.deepcopy(self.projection_head),
                                          "assigner": copy.deepcopy(self.assigner)})
            deactivate_requires_grad(self.teacher)

    def check_hparams(self):
        hp = self.hparams
        self.require(hp.num_prototypes % hp.block_size == 0, "block_size",
                     f"must divide num_prototypes ({hp.num_prototypes}), got {hp.block_size}")

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.assigner(self.projection_head(self.backbone(x)))

    @torch.no_grad()
    def _teacher_scores(self, x: torch.Tensor) -> torch.Tensor:
        t = self.teacher
        return t["assigner"](t["projection_head"](t["backbone"](x)))

    def training_loss(self, batch: TrainBatch):
        hp = self.hparams
        views = batch.views[:2]
        partition = random_partition(hp.num_prototypes, hp.block_size, batch.generator)
        scores = [self._scores(v) for v in views]
        targets = [self._teacher_scores(v) for v in views] if hp.ema_teacher else [None, None]
        consistency, kl = carp_terms(*scores, partition, *targets)
        loss = consistency + self.kl_weight(batch.epoch) * kl
        return loss, {"consistency": consistency.detach(), "kl": kl.detach()}

    def after_optimizer_step(self, progress: float) -> None:
        if self.hparams.ema_teacher:
            momentum = cosine_schedule(int(progress * 10_000), 10_000, self.hparams.ema_momentum_base, 1.0)
            update_momentum(self.backbone, self.teacher["backbone"], m=momentum)
            update_momentum(self.projection_head, self.teacher["projection_head"], m=momentum)
            update_momentum(self.assigner, self.teacher["assigner"], m=momentum)

    @torch.no_grad()
    def cluster_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self._scores(images)
