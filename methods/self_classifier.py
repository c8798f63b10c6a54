"""Self-Classifier (Amrani & Bronstein): a classifier trained with a uniform label prior.

Paper: ../shared/seeds/self-classifier.txt (Algorithm 1, Eq. 3-4, sec. 7.2).

    l(a, b) = -(1/N) sum_n sum_y p(b_n|y) log p(y|a_n)                       (Eq. 3)
    p(y|a)  = softmax(logits_a / row_tau, dim=1)    ("row" softmax over classes)
    p(b|y)  = softmax(logits_b / col_tau, dim=0)    ("column" softmax over the batch)
    L       = (l(a, b) + l(b, a)) / 2                                        (Eq. 4)

No stop-gradient (Algorithm 1 has none): both views get gradient through both factors.
With several heads the loss is the mean over heads. CIFAR variant (sec. 7.2): after
the column softmax, l1-normalise each row of p(b|y) over the classes (`row_l1_norm`).
The paper writes one temperature tau; separate row/column temperatures come from the
official code and the reimplementation (0.1 / 0.05); set both to tau for the paper's.

Paper vs official code: the official code (and the reimplementation's formula) also
normalises the prediction over the batch, log(N/C * p(y|a_n) / sum_m p(y|a_m)).
We follow the paper's Eq. 3; the official variant is the flag
`official_prediction_norm` (see `self_classifier_view_loss`).

Network (sec. 7.2): backbone -> MLP 256-256-64 (BN + LeakyReLU after the first two
layers, l2-normalised output) -> a FIXED bias-free linear classifier per head,
initialised with orthonormal rows, its rows normalised so logits are cosine
similarities. When a head has more classes than the embedding has dimensions,
orthonormal rows are impossible: torch's orthogonal_ then gives orthonormal columns
and we normalise the rows. The classifier is learnable behind `learnable_classifier`
(the paper reports that this is much worse).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from methods import register_method
from methods.base import MethodHparams, SSLMethod, TrainBatch
from ssl_common.distributed import gather_cat


def _as_heads(logits) -> list[torch.Tensor]:
    return list(logits) if isinstance(logits, (list, tuple)) else [logits]


def self_classifier_view_loss(pred_logits: torch.Tensor, target_logits: torch.Tensor, row_tau: float,
                              col_tau: float, row_l1_norm: bool, official_prediction_norm: bool = False,
                              eps: float = 1e-8) -> torch.Tensor:
    """l(a, b) of Eq. 3 for one head on one (already global) batch: a predicts, b is the target."""
    n, num_classes = pred_logits.shape
    x_given_y = F.softmax(target_logits / col_tau, dim=0)  # p(b_n|y): column softmax over the batch
    if row_l1_norm:
        x_given_y = x_given_y / x_given_y.sum(dim=1, keepdim=True)  # sec. 7.2 (CIFAR)
    if official_prediction_norm:
        # official code: log(N/C * p(y|a_n) / sum_m p(y|a_m) + eps)
        y_given_x = F.softmax(pred_logits / row_tau, dim=1)
        y_given_x = y_given_x / y_given_x.sum(dim=0, keepdim=True).clamp_min(eps)
        log_y_given_x = torch.log(n / num_classes * y_given_x + eps)
    else:
        log_y_given_x = F.log_softmax(pred_logits / row_tau, dim=1)  # log p(y|a_n): row softmax
    return -(x_given_y * log_y_given_x).sum() / n


def _symmetric_multi_head_loss(logits_a, logits_b, row_tau, col_tau, row_l1_norm, official_prediction_norm):
    heads_a, heads_b = _as_heads(logits_a), _as_heads(logits_b)
    if len(heads_a) != len(heads_b) or not heads_a:
        raise ValueError(f"self_classifier_loss: need the same non-zero number of heads for both views, "
                         f"got {len(heads_a)} and {len(heads_b)}")
    total = 0.0
    for head_a, head_b in zip(heads_a, heads_b):
        # the column softmax is a statistic of the batch: compute it over the global batch under DDP
        head_a, head_b = gather_cat(head_a), gather_cat(head_b)
        total = total + 0.5 * (  # Eq. 4
            self_classifier_view_loss(head_a, head_b, row_tau, col_tau, row_l1_norm, official_prediction_norm)
            + self_classifier_view_loss(head_b, head_a, row_tau, col_tau, row_l1_norm, official_prediction_norm))
    return total / len(heads_a)


def self_classifier_loss(logits_a, logits_b, row_tau: float, col_tau: float, row_l1_norm: bool) -> torch.Tensor:
    """Eq. 4 averaged over heads; logits_*: raw (pre-temperature) [N, C] logits or a list (one per head).

    Under DDP the logits are gathered first, so the loss is the one of the global batch on every rank.
    """
    return _symmetric_multi_head_loss(logits_a, logits_b, row_tau, col_tau, row_l1_norm, False)


class CosineClassifier(nn.Module):
    """Bias-free linear classifier with unit-norm rows (logits = cosine similarity), orthonormal init."""

    def __init__(self, in_dim: int, num_classes: int, learnable: bool):
        super().__init__()
        weight = torch.empty(num_classes, in_dim)
        nn.init.orthogonal_(weight)  # QR of a random matrix: orthonormal rows (or columns if C > in_dim)
        self.weight = nn.Parameter(weight, requires_grad=learnable)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(z, dim=1), F.normalize(self.weight, dim=1))


@register_method("self_classifier")
class SelfClassifier(SSLMethod):
    display_name = "Self-Classifier"
    paper = "self-classifier"

    class Hparams(MethodHparams):
        heads: list[int] = []  # class counts, one head each; [] = one head of 3x the true classes (over-clustering)
        hidden_dim: int = Field(256, ge=1)
        output_dim: int = Field(64, ge=1)
        row_tau: float = Field(0.1, gt=0)
        col_tau: float = Field(0.05, gt=0)
        row_l1_norm: bool = True
        learnable_classifier: bool = False
        official_prediction_norm: bool = False

        @field_validator("heads")
        @classmethod
        def _heads(cls, value: list[int]) -> list[int]:
            if not all(c >= 2 for c in value):
                raise ValueError(f"must be a list of class counts >= 2, got {value}")
            return value

    def __init__(self, backbone, data, hparams=None):
        super().__init__(backbone, data, hparams)
        hp = self.hparams
        self.head_sizes = list(hp.heads) or [3 * data.num_classes]
        hidden, out = hp.hidden_dim, hp.output_dim
        self.mlp = nn.Sequential(
            nn.Linear(backbone.feature_dim, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(inplace=True),
            nn.Linear(hidden, out),
        )
        self.classifiers = nn.ModuleList(CosineClassifier(out, c, hp.learnable_classifier)
                                         for c in self.head_sizes)

    def _logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = F.normalize(self.mlp(self.backbone(x)), dim=1)  # l2-norm layer after the last hidden layer
        return [classifier(z) for classifier in self.classifiers]

    def training_loss(self, batch: TrainBatch):
        hp = self.hparams
        logits_a, logits_b = (self._logits(v) for v in batch.views[:2])
        loss = _symmetric_multi_head_loss(logits_a, logits_b, hp.row_tau, hp.col_tau, hp.row_l1_norm,
                                          hp.official_prediction_norm)
        return loss, {}

    @torch.no_grad()
    def cluster_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self._logits(images)[0]
