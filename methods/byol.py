"""BYOL (Grill et al., 2020): an online network predicts an EMA target network's projection.

Loss (BYOL sec. 3.1, Eq. 2 and its symmetrisation): with q = the online prediction and z = the
target projection, both l2-normalised,

    L = (2 - 2 cos(q_a, sg(z_b))) + (2 - 2 cos(q_b, sg(z_a))),   mean over the batch   (`byol_loss`)

= the official code's `regression_loss(p1, sg(z2)) + regression_loss(p2, sg(z1))` (deepmind-research
byol_experiment.py). Written by hand: lightly's NegativeCosineSimilarity is -cos, whose
0.5 * (-cos_a - cos_b) has a quarter of this gradient, and the dissertation tuned lr 0.03 for the
official scale (its sec. 5.8.5 adapts the official code).

Settings (dissertation = carl-carp-dissertation.txt, the paper whose BYOL numbers we compare with):

| setting            | paper / code                                                  | suite                         |
|--------------------|---------------------------------------------------------------|-------------------------------|
| heads              | 512 -> 128 with BN, predictor the same (diss. sec. 5.8.2, 5.8.5); | lightly's BYOL heads, 512/128 |
|                    | BYOL paper: 4096 -> 256                                       |                               |
| loss               | the sum of both directions of 2 - 2cos (BYOL sec. 3.1)        | `byol_loss`                   |
| optimizer          | SGD lr 0.03, no LARS (diss. sec. 5.8.5); wd not stated        | suite SGD 0.03, wd 5e-4       |
| EMA momentum       | tau_base 0.996, cosine to 1 (BYOL sec. 3.2); diss. silent     | cifar/stl 0.996; digits/mnist |
|                    |                                                               | 0.99 (short runs)             |
| batch / epochs     | 256 / 200 (diss. sec. 5.8)                                    | the suite's                   |

EMA update and heads from lightly.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from pydantic import Field

from methods import register_method
from methods.base import MethodHparams, SSLMethod, TrainBatch


def byol_loss(pred_a: torch.Tensor, pred_b: torch.Tensor, target_a: torch.Tensor,
              target_b: torch.Tensor) -> torch.Tensor:
    """(2 - 2 cos(q_a, z_b)) + (2 - 2 cos(q_b, z_a)), mean over the batch (BYOL sec. 3.1); no gradient
    flows through the targets z (the stop-gradient sg of BYOL's Eq. 2)."""
    cos_ab = F.cosine_similarity(pred_a, target_b.detach(), dim=1)  # || q/|q| - z/|z| ||^2 = 2 - 2cos
    cos_ba = F.cosine_similarity(pred_b, target_a.detach(), dim=1)
    return ((2 - 2 * cos_ab) + (2 - 2 * cos_ba)).mean()


@register_method("byol")
class BYOL(SSLMethod):
    display_name = "BYOL"
    paper = "carl-carp-dissertation"
    version = 2  # v2: the paper's loss scale (was lightly's 0.5 * (-cos_a - cos_b))

    class Hparams(MethodHparams):
        hidden_dim: int = Field(512, ge=1)  # dissertation sec. 5.8.2: 512 -> 128 for every method
        output_dim: int = Field(128, ge=1)
        momentum_base: float = Field(0.996, ge=0, le=1)  # tau_base (BYOL sec. 3.2), cosine schedule to 1

    def __init__(self, backbone, data, hparams=None):
        super().__init__(backbone, data, hparams)
        hp = self.hparams
        self.projection_head = BYOLProjectionHead(backbone.feature_dim, hp.hidden_dim, hp.output_dim)
        self.prediction_head = BYOLPredictionHead(hp.output_dim, hp.hidden_dim, hp.output_dim)
        self.target_backbone = copy.deepcopy(backbone)
        self.target_projection_head = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.target_backbone)
        deactivate_requires_grad(self.target_projection_head)

    def _online(self, x):
        return self.prediction_head(self.projection_head(self.backbone(x)))

    @torch.no_grad()
    def _target(self, x):
        return self.target_projection_head(self.target_backbone(x))

    def training_loss(self, batch: TrainBatch):
        x_a, x_b = batch.views[:2]
        loss = byol_loss(self._online(x_a), self._online(x_b), self._target(x_a), self._target(x_b))
        return loss, {}

    def after_optimizer_step(self, progress: float) -> None:
        # tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2 (BYOL sec. 3.2), k / K = progress of the run
        momentum = cosine_schedule(int(progress * 10_000), 10_000, self.hparams.momentum_base, 1.0)
        update_momentum(self.backbone, self.target_backbone, m=momentum)
        update_momentum(self.projection_head, self.target_projection_head, m=momentum)
