"""Reference rows of the papers' tables: a randomly initialised and a supervised backbone.

Both go through the same trainer, budget and evaluation as the self-supervised
methods. `random_init` is evaluated without training (the trainer skips methods
whose `train_epochs` is 0); `supervised` trains with the labels, cross-entropy on
the first augmented view.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from methods import register_method
from methods.base import SSLMethod, TrainBatch


@register_method("random_init")
class RandomInit(SSLMethod):
    display_name = "Random init"
    is_reference = True
    skips_training = True

    def training_loss(self, batch: TrainBatch):
        raise RuntimeError("random_init is never trained")


@register_method("supervised")
class Supervised(SSLMethod):
    display_name = "Supervised"
    is_reference = True
    uses_labels = True

    def __init__(self, backbone, data, hparams=None):
        super().__init__(backbone, data, hparams)
        self.classifier = nn.Linear(backbone.feature_dim, data.num_classes)

    def training_loss(self, batch: TrainBatch):
        if batch.labels is None or (batch.labels < 0).any():
            raise ValueError("the supervised reference needs a fully labelled pretraining split")
        loss = F.cross_entropy(self.classifier(self.backbone(batch.views[0])), batch.labels)
        return loss, {}

    def cluster_logits(self, images):
        return self.classifier(self.backbone(images))
