"""Rotation (Gidaris et al., 2018, RotNet): predict which of 0/90/180/270 degrees an image was turned.

The SSL++ paper's Rotation baseline (its proxy task V1, Eq. 3 with a 4-way cross-entropy): every
image of a batch goes in as its four quarter turns, and a head on the backbone's features
classifies the turn. Head: one linear layer on the globally average-pooled features, as in RotNet's
CIFAR NIN (architectures/NetworkInNetwork.py: the 'classifier' block is GlobalAveragePooling +
nn.Linear(192, 4); no MLP).

Settings (sslpp.txt Table II and sec. V-A.4; RotNet's config/CIFAR10_RotNet_NIN4blocks.py):

| setting        | paper                                                   | suite (cifar10-nin / stl10-nin)     |
|----------------|---------------------------------------------------------|-------------------------------------|
| backbone       | NIN, 4 blocks                                           | `nin`                               |
| optimizer      | SGD lr 0.1, momentum 0.9, wd 5e-4                       | the suite's optimizer section       |
| schedule       | steps at [60, 120, 160], factor 10 (SSL++ sec. V-A.4);  | `schedule: step`, gamma 0.1         |
|                | RotNet's code: x0.2 and Nesterov                        |                                     |
| batch / epochs | 128 images (x 4 rotations) / 200                        | 128 / 200                           |
| views          | RotNet: RandomCrop(32, padding 4) + h-flip              | the suite's views (an approximation:|
|                |                                                         | the view pipeline has no padding)   |

The method has no hyperparameters of its own: RotNet feeds the four rotations of each image once,
here those of the first augmented view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods import register_method
from methods.base import SSLMethod, TrainBatch

NUM_ROTATIONS = 4


def rotation_batch(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RotNet's input: the four copies rot90(x, k), k = 0..3 (0/90/180/270 degrees), stacked
    k-major ([4B, C, H, W]: all images at k = 0, then all at k = 1, ...), and their labels k ([4B])."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"the Rotation task needs square images, got {tuple(images.shape[-2:])}")
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(NUM_ROTATIONS)])
    labels = torch.arange(NUM_ROTATIONS, device=images.device).repeat_interleave(images.shape[0])
    return rotated, labels


def rotation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SSL++ Eq. 3 with l the cross-entropy: mean over the 4B copies of -log softmax(logits)[k]."""
    if logits.shape[-1] != NUM_ROTATIONS:
        raise ValueError(f"rotation logits must have {NUM_ROTATIONS} columns, got {tuple(logits.shape)}")
    return F.cross_entropy(logits, labels)


@register_method("rotation")
class Rotation(SSLMethod):
    display_name = "Rotation"
    paper = "sslpp"

    def __init__(self, backbone, data, hparams=None):
        super().__init__(backbone, data, hparams)
        # RotNet's CIFAR head: global average pooling (the backbone's) + one linear layer
        self.rotation_head = nn.Linear(backbone.feature_dim, NUM_ROTATIONS)

    def training_loss(self, batch: TrainBatch):
        rotated, labels = rotation_batch(batch.views[0])  # 4 copies of each image (RotNet)
        logits = self.rotation_head(self.backbone(rotated))
        loss = rotation_loss(logits, labels)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return loss, {"rotation_acc": accuracy}

    def cluster_logits(self, images: torch.Tensor) -> torch.Tensor | None:
        """No clustering head: the suite's k-means on the backbone features scores the clustering."""
        return None
