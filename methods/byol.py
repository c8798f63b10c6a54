"""BYOL (Grill et al., 2020): online network predicts an EMA target's projection.

Dissertation baseline (sec. 5.8.5): projection and predictor heads
feature -> 512 -> 128 with BN, SGD lr 0.03 (no LARS); the EMA momentum follows
BYOL's cosine schedule from `momentum_base` to 1. Heads, loss and EMA update from
lightly.
"""

from __future__ import annotations

import copy

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from pydantic import Field

from methods import register_method
from methods.base import MethodHparams, SSLMethod, TrainBatch


@register_method("byol")
class BYOL(SSLMethod):
    display_name = "BYOL"
    paper = "carl-carp-dissertation"

    class Hparams(MethodHparams):
        hidden_dim: int = Field(512, ge=1)
        output_dim: int = Field(128, ge=1)
        momentum_base: float = Field(0.99, ge=0, le=1)

    def __init__(self, backbone, data, hparams=None):
        super().__init__(backbone, data, hparams)
        hp = self.hparams
        self.projection_head = BYOLProjectionHead(backbone.feature_dim, hp.hidden_dim, hp.output_dim)
        self.prediction_head = BYOLPredictionHead(hp.output_dim, hp.hidden_dim, hp.output_dim)
        self.target_backbone = copy.deepcopy(backbone)
        self.target_projection_head = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.target_backbone)
        deactivate_requires_grad(self.target_projection_head)
        self.criterion = NegativeCosineSimilarity()

    def _online(self, x):
        return self.prediction_head(self.projection_head(self.backbone(x)))

    @torch.no_grad()
    def _target(self, x):
        return self.target_projection_head(self.target_backbone(x)).detach()

    def training_loss(self, batch: TrainBatch):
        x_a, x_b = batch.views[:2]
        p_a, p_b = self._online(x_a), self._online(x_b)
        z_a, z_b = self._target(x_a), self._target(x_b)
        loss = 0.5 * (self.criterion(p_a, z_b) + self.criterion(p_b, z_a))
        return loss, {}

    def after_optimizer_step(self, progress: float) -> None:
        momentum = cosine_schedule(int(progress * 10_000), 10_000, self.hparams.momentum_base, 1.0)
        update_momentum(self.backbone, self.target_backbone, m=momentum)
        update_momentum(self.projection_head, self.target_projection_head, m=momentum)
