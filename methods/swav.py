"""SwAV (Caron et al., 2020): swapped prediction of Sinkhorn-Knopp codes.

Dissertation baseline (sec. 5.8.5): K = 100 prototypes on CIFAR-10, 300 on
CIFAR-100/STL-10; projection head feature -> 512 -> 128. Head, prototypes and
loss from lightly; Sinkhorn runs over the global batch under DDP. Multi-crop:
views beyond the first two are the low-resolution crops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.loss import SwaVLoss
from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
from pydantic import Field

from methods import register_method
from methods.base import MethodHparams, SSLMethod, TrainBatch


@register_method("swav")
class SwAV(SSLMethod):
    display_name = "SwAV"
    paper = "carl-carp-dissertation"

    class Hparams(MethodHparams):
        num_prototypes: int = Field(100, ge=2)
        hidden_dim: int = Field(512, ge=1)
        output_dim: int = Field(128, ge=1)
        temperature: float = Field(0.1, gt=0)
        sinkhorn_iterations: int = Field(3, ge=1)
        sinkhorn_epsilon: float = Field(0.05, gt=0)
        freeze_prototypes_steps: int = Field(0, ge=0)

    def __init__(self, backbone, data, hparams=None):
        super().__init__(backbone, data, hparams)
        hp = self.hparams
        self.projection_head = SwaVProjectionHead(backbone.feature_dim, hp.hidden_dim, hp.output_dim)
        self.prototypes = SwaVPrototypes(hp.output_dim, hp.num_prototypes, hp.freeze_prototypes_steps)
        self.criterion = SwaVLoss(hp.temperature, hp.sinkhorn_iterations, hp.sinkhorn_epsilon,
                                  sinkhorn_gather_distributed=True)

    def _scores(self, x: torch.Tensor, step: int | None = None) -> torch.Tensor:
        z = F.normalize(self.projection_head(self.backbone(x)), dim=1)
        return self.prototypes(z, step)

    def training_loss(self, batch: TrainBatch):
        # lightly's prototypes normalise their weights in place before use (SwAV's recipe)
        self.prototypes.normalize()
        scores = [self._scores(v, batch.step) for v in batch.views]
        loss = self.criterion(scores[:2], scores[2:])
        return loss, {}

    @torch.no_grad()
    def cluster_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self._scores(images)
