"""SimCLR (Chen et al., 2020): NT-Xent between two views of each image.

Settings (dissertation = carl-carp-dissertation.txt, whose SimCLR numbers we compare with):

| setting          | paper                                                          | suite                        |
|------------------|----------------------------------------------------------------|------------------------------|
| projection head  | 512 -> 512 -> 128, ReLU, **no BN** (diss. sec. 5.8.2)          | Linear-ReLU-Linear, no BN    |
| temperature      | 0.2 "instead of 0.5" (diss. sec. 5.8.5)                        | 0.2                          |
| optimizer        | SGD lr 0.03, LARS removed (diss. sec. 5.8.5)                   | suite SGD 0.03               |
| batch / epochs   | 256 / 200 (diss. sec. 5.8, 5.8.5)                              | the suite's                  |

The head, read from sec. 5.8.2: "a non-linear 2-hidden layer fully-connected network g(.)" with
"The hidden layer ... contains 512 neurons" (one hidden layer: the two layers are the two linear
maps, as SimCLR v1's g = W2 relu(W1 h) and the author's own SimCLR code), "For CARL, SwAV, and BYOL,
the projection head also has batch normalization layers" -- so SimCLR's has none. lightly's
SimCLRProjectionHead defaults to BN after the hidden layer and the output; here batch_norm=False.
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
    version = 2  # v2: projection head without BN (dissertation sec. 5.8.2)

    class Hparams(MethodHparams):
        temperature: float = Field(0.2, gt=0)
        hidden_dim: int = Field(512, ge=1)
        output_dim: int = Field(128, ge=1)

    def __init__(self, backbone, data, hparams=None):
        super().__init__(backbone, data, hparams)
        hp = self.hparams
        # one hidden layer, no BN (sec. 5.8.2; see the module docstring)
        self.projection_head = SimCLRProjectionHead(backbone.feature_dim, hp.hidden_dim, hp.output_dim,
                                                    num_layers=2, batch_norm=False)
        self.criterion = NTXentLoss(temperature=hp.temperature, gather_distributed=True)

    def training_loss(self, batch: TrainBatch):
        z_a, z_b = (self.projection_head(self.backbone(v)) for v in batch.views[:2])
        loss = self.criterion(z_a, z_b)
        return loss, {}
