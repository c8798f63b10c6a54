"""CARP, Consistent Assignment of Random Partition Sets (Silva, dissertation ch. 6).

Paper: ../shared/seeds/carl-carp-dissertation.txt, Eq. 6.1-6.9, sec. 6.5.4.

CARL (methods/carl.py) done block-wise: every iteration the K prototypes are split by a fresh random
partition into N_P = K / N_B blocks of N_B prototypes (Eq. 6.2), and for view i and block j

    p_{i,j} = softmax(scores_i[block_j])              softmax over the block only (Eq. 6.3-6.4)
    L_c  = -1/(B N_P) sum_i sum_j log <p^a_{i,j}, sg(p^b_{i,j})>, symmetrised as CARL      (Eq. 6.5)
    L    = L_c + lambda_e * L_KL                       (Eq. 6.9, lambda_e of Eq. 5.8)

The uniformity term L_KL: the text disagrees with itself and with the official code. Every reading is
implemented (`uniformity`); with pbar_j^v = mean_i p^v_{i,j} (Eq. 6.7) and
R := sum_{v in a,b} 1/N_P sum_j KL(pbar_j^v || U_{N_B}) (the default), each reading's weight on the
gradient relative to R (it multiplies lambda_e):

| `uniformity`       | what it computes (summed over the views a, b unless said)     | weight vs R           |
|--------------------|---------------------------------------------------------------|-----------------------|
| `block_mean`       | 1/N_P sum_j (log N_B + sum_c pbar_j log pbar_j)   (default)    | x 1                   |
| `eq6.6_sum`        | Eq. 6.6 as printed: log K + sum_j sum_c pbar_j log pbar_j      | x N_P (constant aside)|
| `eq6.8_one_block`  | Eq. 6.8 as printed: log K + sum_c pbar_j log pbar_j, one block | x 1 in expectation,   |
|                    | j (the free index; block 0 of the random partition = a random | one block per step    |
|                    | block)                                                        | (more variance)       |
| `official_pooled`  | official code (sthalles/carp carp_loss.py): the views pooled   | x 1/2 (exact when     |
|                    | into one pbar_j = mean over a, b (and the EMA teacher's views  | pbar^a = pbar^b; less |
|                    | when on), 1/N_P sum_j (log N_B + sum pbar_j log pbar_j), once | otherwise, convexity);|
|                    | (not per view); the code uses lambda = 1, no schedule          | x 1/4 with the teacher|

Default `block_mean`, the reading the text supports best: the chapter defines CARP as "CARL's
[task] but done block-wise" (sec. 6.3, Fig. 6.1), Eq. 6.5 averages the consistency over blocks
(1/(B N_P)), and Eq. 6.6's left side is one block's KL(P_j || U) -- averaging that block-wise CARL
term over blocks like Eq. 6.5 keeps L_c and L_KL on CARL's scale (so lambda_e 2 -> 0.15 of sec. 6.5.4
means what it means for CARL), and with one block CARP is CARL exactly (Eq. 6.1). The sum in Eq. 6.6
(x N_P, 12 on ImageNet) and the single block of Eq. 6.8 are kept as variants. The constants (log K vs
N_P log N_B) do not change gradients; as printed, Eq. 6.6 can be negative.

The official code (sthalles/carp @c9b068b: main_carp.py, modules/carp_loss.py, modules/carp_head.py) differs
from the dissertation beyond the KL reading, and its loss is only the official one WITH its EMA teacher:

| setting        | dissertation (`carp`)                  | official code (`carp/official`)             | suite `carp/official`     |
|----------------|----------------------------------------|---------------------------------------------|---------------------------|
| targets        | the other view's own assignments,      | an EMA teacher's (backbone + head; only the | `ema_teacher: true`       |
|                | stop-gradient (Eq. 6.5)                | 2 global views, main_carp.py L310, L331)    |                           |
| L_KL           | per view, lambda_e 2 -> 0.15 (6.5.4)   | ONE KL of the pooled student and detached   | `official_pooled`, lambda |
|                |                                        | teacher probabilities (carp_loss.py L35-41) | 1 (no schedule)           |
|                |                                        | , loss = c + h (main_carp.py L317, L338)    |                           |
| clamp          | -- (suite: dot >= 1e-7)                | dot and the KL's log in [eps, 1 - eps], eps | `clamp: official`         |
|                |                                        | = 1.19e-7 (float32; carp_loss.py L16-18,    |                           |
|                |                                        | L22, L44-50)                                |                           |
| head           | 2-layer assigner with BN (6.2, 6.5.2)  | Linear(d, 2048)-BN-GELU-Linear(2048, 2048)- | `head: official`: the     |
|                |                                        | BN-GELU-Linear(2048, 256), trunc-normal     | same (2048 / 256 kept)    |
|                |                                        | 0.02; prototypes weight-normalised Linear(  |                           |
|                |                                        | 256, K, bias=False), g fixed at 1           |                           |
|                |                                        | (carp_head.py L7-36; main_carp.py L36-43)   |                           |
| K / N_B        | 3000 / 250 (ImageNet, sec. 6.5.4)      | 65,536 / 512 (main_carp.py L36, L67)        | the suite's K / N_B (*)   |
| teacher EMA    | --                                     | 0.99 -> 1 cosine per step (L40, L205, L344) | 0.99 -> 1 cosine per step |
| optimizer      | LARS 5.4 -> 0.00054, wd 1e-6           | LARS 0.45 x batch / 256 -> 0.0048 cosine,   | LARS 0.45 x batch / 256   |
|                |                                        | wd 1e-6, no warm-up (L48-63)                | -> 0.0048, wd 1e-6 (**)   |
| views          | 2                                      | 2 global (0.2, 1) + 6 local (L73-76)        | the suite's 2 views       |

(*) Not scaled: 65,536 prototypes in blocks of 512 are ImageNet-1k's; scaled by the classes (x 1/100 for
CIFAR-10) they would be 655 in blocks of 5, fewer prototypes per block than classes. The official variant keeps
the suite's `carp` K and N_B so it differs from `carp` only in what the official code does differently.
(**) The per-batch rule is the code's own (lr x batch / 256); the end value 0.0048 is absolute there. The
teacher's momentum schedule is per step over the whole run, so it needs no scaling. Not implemented: multi-crop,
the code's EMA update before (not after) each optimizer step, its cosine weight-decay schedule (constant 1e-6).

`carp/pooled-kl` (formerly `carp/official-kl`) is the official code's pooled KL with lambda 1 but WITHOUT its
teacher: not the official loss (its KL gradient is 2x the official one, the consistency targets are the other
view's own probabilities); kept as a reading of the KL term.

Settings (sec. 6.5.4, ImageNet only -- the dissertation gives no CIFAR/STL values for CARP):
K 3000, N_B 250 (N_P 12), lambda_e 2.0 -> 0.15 over the first 30 epochs, LARS 5.4 -> 0.00054 cosine,
wd 1e-6, batch 256; assigner a two-layer MLP with BN (sec. 6.2, 6.5.2) whose last layer holds the
prototypes without bias (Eq. 6.3). The suites choose K, N_B and the optimizer for CIFAR/STL and say so.

Choices: the partition is drawn from the step's seeded generator (TrainBatch.generator, seeded by
(seed, step)), so it survives resume and is the same on every DDP rank. The official code's EMA teacher
(targets from an EMA copy of backbone + heads) is the flag `ema_teacher`, off by default (the dissertation has
none); every variant named "official" sets it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from pydantic import Field
from torch import nn

from methods import register_method
from methods.base import TrainBatch, WeightNormLinear
from methods.carl import AssignmentHparams, AssignmentMethod, consistency_term, kl_to_uniform
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


def _neg_entropy(probs: torch.Tensor) -> torch.Tensor:
    """sum_c pbar_{j,c} log pbar_{j,c} per block: [N, n_blocks, N_B] -> [n_blocks] (Eq. 6.6-6.7)."""
    mean = probs.mean(dim=0)
    return torch.xlogy(mean, mean).sum(dim=-1)


def uniformity_block_mean(*probs: torch.Tensor) -> torch.Tensor:
    """Default reading: per view, the mean over blocks of KL(pbar_j || U_{N_B}); the views' terms added
    (as CARL's Listing 2 adds its views' terms)."""
    return sum(kl_to_uniform(p) for p in probs)


def uniformity_eq6_6_sum(*probs: torch.Tensor) -> torch.Tensor:
    """Eq. 6.6 as printed, per view: log K + sum_j sum_c pbar_{j,c} log pbar_{j,c}; views added."""
    return sum(math.log(p.shape[1] * p.shape[2]) + _neg_entropy(p).sum() for p in probs)


def uniformity_eq6_8_one_block(*probs: torch.Tensor) -> torch.Tensor:
    """Eq. 6.8 as printed, per view: log K + sum_c pbar_{j,c} log pbar_{j,c} for one block j (block 0 of the
    random partition, so a uniformly random block); views added."""
    return sum(math.log(p.shape[1] * p.shape[2]) + _neg_entropy(p[:, :1]).sum() for p in probs)


def uniformity_official_pooled(*probs: torch.Tensor) -> torch.Tensor:
    """The official code (sthalles/carp carp_loss.py): every view's probabilities pooled along the batch into
    one pbar_j, then the mean over blocks of log N_B + sum_c pbar_j log pbar_j -- one term, not one per view."""
    return kl_to_uniform(torch.cat(probs, dim=0))


OFFICIAL_EPS = torch.finfo(torch.float32).eps  # 1.19e-7: the official code's clamp (carp_loss.py L22)


def consistency_official_clamp(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-mean log <p, sg(t)> with the dot clamped to [eps, 1 - eps] (carp_loss.py L16-18), eps = 1.19e-7."""
    dot = (probs * targets.detach()).sum(dim=-1)
    return -torch.log(dot.clamp(OFFICIAL_EPS, 1.0 - OFFICIAL_EPS)).mean()


def uniformity_official_pooled_clamped(*probs: torch.Tensor) -> torch.Tensor:
    """`official_pooled` with the official code's clamp inside the log (carp_loss.py L44-50):
    1/N_P sum_j (log N_B + sum_c pbar_jc log clamp(pbar_jc, eps, 1 - eps))."""
    mean = torch.cat(probs, dim=0).mean(dim=0)
    kl = math.log(mean.shape[-1]) + (mean * torch.log(mean.clamp(OFFICIAL_EPS, 1.0 - OFFICIAL_EPS))).sum(dim=-1)
    return kl.mean()


UNIFORMITY: dict[str, Callable[..., torch.Tensor]] = {
    "block_mean": uniformity_block_mean,
    "eq6.6_sum": uniformity_eq6_6_sum,
    "eq6.8_one_block": uniformity_eq6_8_one_block,
    "official_pooled": uniformity_official_pooled,
}


def carp_terms(scores_a: torch.Tensor, scores_b: torch.Tensor, partition: torch.Tensor,
               target_scores_a: torch.Tensor | None = None, target_scores_b: torch.Tensor | None = None,
               uniformity: str = "block_mean", clamp: str = "below") -> tuple[torch.Tensor, torch.Tensor]:
    """(L_c, L_KL) over the global batch; targets from a teacher if given, else the other view.

    L_KL is the `uniformity` reading (see the module docstring); the official code's pooled reading also
    pools the teacher's views when there is a teacher. `clamp="official"`: the official code's clamps (the
    dot and the KL's log in [1.19e-7, 1 - 1.19e-7]; only with `official_pooled`); "below": dot >= 1e-7."""
    if clamp == "official" and uniformity != "official_pooled":
        raise ValueError("carp_terms: clamp='official' is the official code's, whose KL is 'official_pooled'")
    probs_a, probs_b = (block_probs(gather_cat(s), partition) for s in (scores_a, scores_b))
    teacher = target_scores_a is not None
    targets_a, targets_b = probs_a, probs_b  # CARL's targets: the other view's own assignments
    if teacher:
        targets_a, targets_b = (block_probs(gather_cat(s.detach()), partition)
                                for s in (target_scores_a, target_scores_b))
    term = consistency_official_clamp if clamp == "official" else consistency_term
    consistency = 0.5 * term(probs_a, targets_b) + 0.5 * term(probs_b, targets_a)  # Eq. 6.5
    pooled = (probs_a, probs_b, targets_a, targets_b) if teacher and uniformity == "official_pooled" else (
        probs_a, probs_b)
    kl_fn = uniformity_official_pooled_clamped if clamp == "official" else UNIFORMITY[uniformity]
    return consistency, kl_fn(*pooled)


def carp_loss(scores_a: torch.Tensor, scores_b: torch.Tensor, partition: torch.Tensor,
              kl_weight: float) -> torch.Tensor:
    """Eq. 6.9 on the prototype scores [N, K] of two views for one partition [n_blocks, N_B] (default
    uniformity reading, `block_mean`)."""
    consistency, kl = carp_terms(scores_a, scores_b, partition)
    return consistency + kl_weight * kl


def carp_loss_reading(scores_a: torch.Tensor, scores_b: torch.Tensor, partition: torch.Tensor, kl_weight: float,
                      uniformity: str) -> torch.Tensor:
    """`carp_loss` with another reading of the uniformity term (`UNIFORMITY`)."""
    consistency, kl = carp_terms(scores_a, scores_b, partition, uniformity=uniformity)
    return consistency + kl_weight * kl


def official_head(in_dim: int, num_prototypes: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                  num_layers: int = 3) -> tuple[nn.Sequential, WeightNormLinear]:
    """The official code's CARPHead (modules/carp_head.py L7-36 with use_bn=True, norm_last_layer=True as
    main_carp.py L38-43 default): (MLP, prototypes). MLP: Linear(in, hidden)-BN-GELU, (num_layers - 2) x
    Linear(hidden, hidden)-BN-GELU, Linear(hidden, bottleneck); Linear weights trunc-normal std 0.02, biases 0.
    Prototypes: a weight-normalised Linear(bottleneck, K, bias=False) with g fixed at 1 (unit rows); the
    bottleneck output is not normalised (carp_head.py L38-41)."""
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.GELU()]
        dim = hidden_dim
    layers.append(nn.Linear(dim, bottleneck_dim))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers), WeightNormLinear(bottleneck_dim, num_prototypes, learn_gain=False)


@register_method("carp")
class CARP(AssignmentMethod):
    display_name = "CARP"
    paper = "carl-carp-dissertation"
    version = 2  # v2: `head: official`, `clamp: official` (the official code's head and clamps)

    class Hparams(AssignmentHparams):
        num_prototypes: int = Field(300, ge=2)  # K (ImageNet: 3000)
        block_size: int = Field(30, ge=2)  # N_B (ImageNet: 250, N_P = 12)
        # projection head 512 -> 128 (as CARL on CIFAR)
        assigner_hidden_dim: int = Field(512, ge=1)  # two-layer assigner with BN, as wide as the projection head (sec. 6.5.2)
        kl_weight_start: float = Field(2.0, ge=0)  # lambda_e: 2.0 -> 0.15 over the first 30 epochs (sec. 6.5.4)
        kl_weight_end: float = Field(0.15, ge=0)
        kl_decay_epochs: int = Field(30, ge=0)
        # the reading of L_KL (module docstring); the official code's `official_pooled` runs with lambda 1 and
        # its EMA teacher (suite variant `carp/official`; `carp/pooled-kl` without the teacher)
        uniformity: Literal["block_mean", "eq6.6_sum", "eq6.8_one_block", "official_pooled"] = "block_mean"
        ema_teacher: bool = False  # the official code: targets from an EMA teacher
        ema_momentum_base: float = Field(0.99, ge=0, le=1)  # teacher momentum, cosine schedule to 1 (main_carp L205)
        # dissertation: projection head (hidden_dim -> output_dim) + the two-layer assigner; official: the official
        # code's CARPHead (3-layer GELU MLP with BN, bottleneck, weight-normalised prototypes with g fixed at 1)
        head: Literal["dissertation", "official"] = "dissertation"
        official_hidden_dim: int = Field(2048, ge=1)  # head: official (carp_head.py L8 hidden_dim 2048)
        official_bottleneck_dim: int = Field(256, ge=1)  # head: official (main_carp.py L69 bottleneck_dim 256)
        official_layers: int = Field(3, ge=2)  # head: official (carp_head.py L8 nlayers 3)
        # below: the dot clamped at 1e-7 from below (CARL's); official: dot and the KL's log in [eps, 1 - eps],
        # eps = 1.19e-7 (carp_loss.py L16-18, L44-50), only with uniformity official_pooled
        clamp: Literal["below", "official"] = "below"

    def __init__(self, backbone, data, hparams=None):
        super().__init__(backbone, data, hparams)
        hp = self.hparams
        if hp.head == "official":  # the official CARPHead replaces the projection head and the assigner
            self.projection_head, self.assigner = official_head(
                backbone.feature_dim, hp.num_prototypes, hp.official_hidden_dim, hp.official_bottleneck_dim,
                hp.official_layers)
        else:
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
        self.require(hp.clamp != "official" or hp.uniformity == "official_pooled", "clamp",
                     "official is the official code's clamp, whose KL is uniformity: official_pooled")

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
        consistency, kl = carp_terms(*scores, partition, *targets, uniformity=hp.uniformity, clamp=hp.clamp)
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
