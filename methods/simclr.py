"""SimCLR (Chen et al., 2020): NT-Xent between two views of each image.

Baseline settings of the CARL dissertation (sec. 5.8.5): projection head
feature -> 512 -> 128 with BN, temperature 0.2 on CIFAR, SGD lr 0.03 (no LARS).
Loss and head from lightly; the loss gathers negatives over all DDP ranks.
"""

from __future__ import annotations

from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from pydantic import Field

from methods import register_method
from methods.base import MethodHparams, SSLMethod, TrainBatch


@register_method("simclr")
class SimCLR(SSLMethod):
    display_name = "SimCLR"
    paper = "carl-carp-dissertation"

    class Hparams(MethodHparams):
        temperature: float = Field(0.2, gt=0)
        hidden_dim: int = Field(512, ge=1)
        output_dim: int = Field(128, ge=1)

    def __init__(self, backbone, data, hparams=None):
        super().__init__(backbone, data, hparams)
        hp = self.hparams
        self.projection_head = SimCLRProjectionHead(backbone.feature_dim, hp.hidden_dim, hp.output_dim)
        self.criterion = NTXentLoss(temperature=hp.temperature, gather_distributed=True)

    def training_loss(self, batch: TrainBatch):
        z_a, z_b = (self.projection_head(self.backbone(v)) for v in batch.views[:2])
        loss = self.criterion(z_a, z_b)
        return loss, {}
