"""Self-Classifier (Amrani & Bronstein): a classifier trained with a uniform label prior.

Papers: ../shared/seeds/self-classifier.txt (Algorithm 1, Eq. 3-4, sec. 7.2-7.4) and the KTH
reimplementation ../shared/seeds/self-classifier-reimplementation.txt (sec. 3.2-3.3, 5.4).

    l(a, b) = -(1/N) sum_n sum_y p(b_n|y) log p(y|a_n)                       (Eq. 3)
    p(y|a)  = softmax(logits_a / row_tau, dim=1)    ("row" softmax over classes)
    p(b|y)  = softmax(logits_b / col_tau, dim=0)    ("column" softmax over the batch)
    L       = (l(a, b) + l(b, a)) / 2                                        (Eq. 4)

No stop-gradient (Algorithm 1 has none): both views get gradient through both factors.
CIFAR (sec. 7.2): after the column softmax, l1-normalise each row of p(b|y) over the classes
(`row_l1_norm`). The paper writes one temperature tau; set row_tau = col_tau = tau for it.

The reimplementation's loss (its sec. 3.2) is not Eq. 3: the prediction is renormalised over the
batch per class, log p(y|a_n) -> log(N/C * p(y|a_n) / sum_m p(y|a_m) + 1e-8), with the target
l1-normalised over the classes (= `row_l1_norm`). The eps inside the log is the official code's
(SC-v2 src/loss.py; the reimplementation's formula has none, its code only F.normalize's floor).
Flag `official_prediction_norm`. We follow the paper's Eq. 3 by default; the suites' variant
`self_classifier/reimpl` uses the reimplementation's loss and settings.

Several heads (logits as a list): the loss is the mean over heads, as the original code (SC-v1
loss.py `loss /= len(all_out1)`, SC-v2 the mean over heads and view pairs). The reimplementation's
code *sums* over heads (KTH train.py `L += ...`; its report does not say): with its 4 heads its
gradient is 4x ours at the same lr. We keep the mean (the contract), so `self_classifier/reimpl`
at the report's lr 0.4 takes a quarter of the KTH code's step on the loss.

Network (sec. 7.2): backbone -> MLP 256-256-64 (BN + LeakyReLU after the first two layers,
l2-normalised output; `mlp_layers: 2` for the reimplementation's "2-layer MLP", sec. 3.3) -> a FIXED
bias-free linear classifier per head with orthonormal init, rows normalised so logits are cosine
similarities (`classifier: cosine`). When a head has more classes than the embedding has dimensions,
orthonormal rows are impossible: torch's orthogonal_ gives orthonormal columns and we normalise the rows.
Learnable behind `learnable_classifier` (the paper reports it is much worse; the KTH and SC-v2 code learn it).

The reimplementation's network (KTH code, riccardoperiotto/KTH-DD2412-DeepLearningAdvanced @5068449,
Self-Classifier/model.py; its report sec. 3.3 says only "a 2-layer MLP"), the flags `mlp_style: reimpl` and
`classifier: weight_norm` that the suites' `self_classifier/reimpl` sets:
- MLP (model.py L10-18): Linear(512, 4096)-BN-LeakyReLU-Linear(4096, 128)-BN-LeakyReLU -- BN and LeakyReLU
  after the LAST layer too, so the l2-normalised embedding (L29-32) is non-negative up to LeakyReLU's 0.01
  slope; Linear weights trunc-normal std 0.02, biases 0 (L20-27). (digits: 512 wide instead of 4096.)
- Heads (L35-45): one learned weight-normalised Linear(128, C, bias=False) per head, w = g v / ||v|| per
  row, g initialised to 1 and trained with v (torch's weight_norm; the default Linear init of v). The
  logits read the embedding as it is (already unit-norm), not re-normalised.

Settings (paper = self-classifier.txt; reimpl = the reimplementation; suite = cifar10.yaml etc.):

| setting        | paper (`self_classifier`)                    | reimpl (`self_classifier/reimpl`)             |
|----------------|----------------------------------------------|-----------------------------------------------|
| loss           | Eq. 3-4                                      | sec. 3.2 (official_prediction_norm)           |
| heads          | one head, 3x classes (30 / 60), sec. 7.2     | [1, 2, 4, 8] x classes (sec. 3.3, Table 2)    |
|                | (SC-v1 scripts: 30 heads: `/official`)       |                                               |
| tau row / col  | 0.3 / 0.3 (sec. 7.2)                         | 0.1 / 0.05; STL-10 0.07 / 0.05 (Table 2)      |
| MLP            | 256-256-64 (sec. 7.2)                        | 2 layers (sec. 3.3); code: 4096 -> 128, BN +  |
|                |                                              | LeakyReLU after both (model.py L10-18)        |
| classifier     | fixed orthonormal cosine rows (sec. 7.2)     | learned weight-normalised Linear, g = 1 at    |
|                |                                              | init, trained (model.py L35-45)               |
| optimizer      | SGD m 0.9 lr 3.2 -> 0.032 cosine, wd 1e-6    | SGD m 0.9, 0.01 -> 0.4 warm-up 10 ep, cosine  |
|                | (sec. 7.4 cites LARS [31]; SC-v1 code: plain |   to 0.0004, wd 1e-4 (sec. 3.3)               |
|                | SGD, no warm-up) -- suite: plain SGD         |                                               |
| batch / epochs | 256 / 800 -- suite: 256 / the suite's 200    | 512 / 800; STL-10 300 (sec. 3.3, 5.4)         |
| augmentation   | MoCo-v2, crop [0.2, 1] (sec. 7.3)            | BYOL's (sec. 3.3): asymmetric blur/solarize   |
| backbone       | ResNet-18 (suite: its backbone)              | ResNet-18, ImageNet stem (suite: its backbone)|

Which reading each variant follows: `self_classifier` (and `/official`) the paper; `self_classifier/reimpl`
the reimplementation's report (loss, heads, temperatures, optimizer, views) and, where the report is silent
(MLP widths, final BN + LeakyReLU, learned weight-normalised heads), its code. Its code's configs differ from
its report (configs/cifar10.yaml L5 t_col 0.03, L13 lr 0.04, L24 `optimizer: adam` = AdamW in train.py L94-95,
L15 wd 1e-6): the suites follow the report (tau_col 0.05, SGD 0.4, wd 1e-4).

Differences kept on purpose: the suite's backbone and pretraining split (the reimplementation's
code pretrains STL-10 on the 5k labelled images only); the default variant trains for the suite's
epochs (one budget for every method of a suite); digits keeps its 8x8 view pipeline and batch.

Cluster prediction: argmax of a head; `cluster_logits` returns every head (the head with K = the
true classes first) when there are several.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from methods import register_method
from methods.base import MethodHparams, SSLMethod, TrainBatch, WeightNormLinear
from ssl_common.distributed import gather_cat


def _as_heads(logits) -> list[torch.Tensor]:
    return list(logits) if isinstance(logits, (list, tuple)) else [logits]


PREDICTION_NORM_EPS = 1e-8  # the official code's eps inside the log (SC-v2 src/loss.py Loss default)


def self_classifier_view_loss(pred_logits: torch.Tensor, target_logits: torch.Tensor, row_tau: float,
                              col_tau: float, row_l1_norm: bool, official_prediction_norm: bool = False,
                              eps: float = PREDICTION_NORM_EPS) -> torch.Tensor:
    """l(a, b) of Eq. 3 for one head on one (already global) batch: a predicts, b is the target."""
    n, num_classes = pred_logits.shape
    x_given_y = F.softmax(target_logits / col_tau, dim=0)  # p(b_n|y): column softmax over the batch
    if row_l1_norm:
        x_given_y = x_given_y / x_given_y.sum(dim=1, keepdim=True)  # sec. 7.2 (CIFAR); reimpl. sec. 3.2
    if official_prediction_norm:
        # reimplementation sec. 3.2 (+ the official code's eps): log(N/C * p(y|a_n) / sum_m p(y|a_m) + eps)
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


def self_classifier_loss(logits_a, logits_b, row_tau: float, col_tau: float, row_l1_norm: bool,
                         official_prediction_norm: bool = False) -> torch.Tensor:
    """Eq. 4 averaged over heads; logits_*: raw (pre-temperature) [N, C] logits or a list (one per head).

    `official_prediction_norm=True`: the reimplementation's loss (its sec. 3.2), log p(y|a_n) replaced by
    log(N/C * p(y|a_n) / sum_m p(y|a_m) + 1e-8). Under DDP the logits are gathered first, so the loss is
    the one of the global batch on every rank (N = the global batch).
    """
    return _symmetric_multi_head_loss(logits_a, logits_b, row_tau, col_tau, row_l1_norm, official_prediction_norm)


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
    # v2: `mlp_style` (the reimplementation's final BN + LeakyReLU) and `classifier: weight_norm` (its learned heads)
    version = 2

    class Hparams(MethodHparams):
        # class counts, one head each; [] = one head of 3x the true classes (sec. 7.2 over-clustering)
        heads: list[int] = []
        mlp_layers: int = Field(3, ge=2)  # 3: 256-256-64 (sec. 7.2); 2: the reimplementation's (sec. 3.3)
        hidden_dim: int = Field(256, ge=1)
        output_dim: int = Field(64, ge=1)
        row_tau: float = Field(0.3, gt=0)  # the paper's one tau 0.3 (sec. 7.2); reimpl. 0.1 (sec. 3.3)
        col_tau: float = Field(0.3, gt=0)  # reimpl. 0.05
        row_l1_norm: bool = True  # sec. 7.2 (CIFAR); also the reimplementation's target (sec. 3.2)
        learnable_classifier: bool = False  # `classifier: cosine` only
        # paper: Linear-BN-LeakyReLU blocks then a plain Linear (sec. 7.2); reimpl: BN + LeakyReLU after the last
        # Linear too and trunc-normal(0.02) Linear init (the reimplementation's model.py L10-27)
        mlp_style: Literal["paper", "reimpl"] = "paper"
        # cosine: fixed orthonormal cosine rows (sec. 7.2); weight_norm: learned weight-normalised heads (model.py L35-45)
        classifier: Literal["cosine", "weight_norm"] = "cosine"
        official_prediction_norm: bool = False  # True: the reimplementation's loss (sec. 3.2)

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
        layers: list[nn.Module] = []
        dim = backbone.feature_dim
        for _ in range(hp.mlp_layers - 1):  # BN + LeakyReLU after every hidden layer (sec. 7.2)
            layers += [nn.Linear(dim, hp.hidden_dim), nn.BatchNorm1d(hp.hidden_dim), nn.LeakyReLU(inplace=True)]
            dim = hp.hidden_dim
        layers.append(nn.Linear(dim, hp.output_dim))
        if hp.mlp_style == "reimpl":  # model.py L15-17: BN + LeakyReLU after the last Linear as well
            layers += [nn.BatchNorm1d(hp.output_dim), nn.LeakyReLU(inplace=True)]
            for layer in layers:
                if isinstance(layer, nn.Linear):  # model.py L20-27
                    nn.init.trunc_normal_(layer.weight, std=0.02)
                    nn.init.zeros_(layer.bias)
        self.mlp = nn.Sequential(*layers)
        out = hp.output_dim
        if hp.classifier == "weight_norm":
            self.classifiers = nn.ModuleList(WeightNormLinear(out, c, learn_gain=True) for c in self.head_sizes)
        else:
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
    def cluster_logits(self, images: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """One head: its logits; several: all of them, the head with K = the true classes first."""
        logits = self._logits(images)
        if len(logits) == 1:
            return logits[0]
        main = [i for i, c in enumerate(self.head_sizes) if c == self.data.num_classes][:1]
        return [logits[i] for i in main] + [h for i, h in enumerate(logits) if i not in main]
