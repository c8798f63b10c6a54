"""SSL++ (Chen et al., IEEE TIP): IIC pseudo-labels decoupled from a proxy task (sslpp.txt).

Two decoupled stages (Fig. 2), each a `Stage` of its own (its own fit, budget, optimizer, schedule and
views; `stages()` / `set_stage()`):

  stage 1, "clustering": train IIC's clustering model Phi (methods/iic.py: its own copy of the
    backbone, Sobel input, main + 70-way over-clustering heads) with IIC's own budget and Adam;
  stage 2, "rotation": pseudo-labels z_n = argmax of Phi's over-clustering head on the clean
    pretraining images, computed once at the stage's start; then the representation model
    `self.backbone` trains with L = L_s + lambda * L_c (Eq. 5): L_s the Rotation proxy task (Eq. 3:
    4-way CE over 0/90/180/270 degrees, `methods.rotation.rotation_batch`), L_c the CE of a linear
    head V2 on the pseudo-labels (Eq. 4).
`set_stage` freezes the other stage's model, so each stage's optimizer holds only its own parameters.
The evaluated backbone is the stage-2 representation model; `cluster_logits` gives stage 1's heads.

Settings (sslpp.txt; Table II is its "Implementation details"):

| setting             | paper                                                        | suite (cifar10-nin / stl10-nin)  |
|---------------------|--------------------------------------------------------------|----------------------------------|
| backbone            | NIN, 4 blocks (sec. V-A.1, Table I)                          | `nin`                            |
| lambda              | 0.05 for Rotation (sec. V-A.4, Fig. 6)                       | `pseudo_label_weight` 0.05       |
| clusters            | 70, "in all experiments" (Table XIII)                        | `num_clusters` 70                |
| clustering views    | weak Cr+G+S, strong Cr+F+Co+G+S (Table XIV)                  | `clustering_views`, `sobel`      |
| clustering budget   | not given in SSL++; IIC's code: Adam lr 1e-4, no schedule,   | `clustering_optimizer` (IIC's    |
|                     | 2000 epochs, 220 images x 3 pairs (IIC commands.txt)         | Adam), `clustering_epochs`,      |
|                     |                                                              | `clustering_batch_size`          |
| Rotation stage      | SGD lr 0.1, batch 128, 200 epochs, steps [60, 120, 160] by a | the method's optimizer / train:  |
|                     | factor 10 (Table II + sec. V-A.4), momentum 0.9, wd 5e-4     | `schedule: step`, gamma 0.1      |
| Rotation input      | 4 rotated copies per image (RotNet)                          | `rotation_copies` 4              |

Which IIC head gives the 70-way labels: the paper only says "we use 70 clusters with IIC (i.e., a
70-way classification task)" (sec. V-E). Its Table XIII reports a one-to-one (Hungarian) cluster
accuracy of 54.4% at 70 clusters, which a 70-way head cannot reach with one-to-one matching on 10
classes; it reads as IIC's 10-way main head trained beside a 70-way over-clustering head, as IIC
itself does on CIFAR-10. So stage 1 is IIC with both heads and the pseudo-labels come from the
over-clustering head (`main_head: false` trains the 70-way head alone).

Choices where the paper is silent (each at its hparam):
- L_c on every rotated copy (Eq. 3 and 4 share the input x_n); `pseudo_labels_upright_only` applies it
  to the 0-degree copies only.
- The online kNN monitor (a suite's `train.online_knn_every`) follows stage 1's trunk during stage 1 and
  the representation model during stage 2 (`monitored_backbone`): each stage's curve is the network it trains.
- The clustering stage's trunk is a copy of the suite's backbone (SSL++ does not name IIC's trunk; IIC
  uses a ResNet-34-like net5g), with a 2-channel input conv when `sobel`.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from methods import register_method
from methods.base import EpochContext, SSLMethod, Stage, TrainBatch
from methods.iic import EPS, ClusteringModel, IICHparams, iic_loss  # noqa: F401  (iic_loss: a contract here)
from methods.rotation import rotation_batch
from ssl_common.errors import ConfigError
from ssl_common.typed import OptimizerConfig, validate, validate_nested

# IIC's optimizer (its code: Adam, lr 1e-4, no schedule); AdamW with weight decay 0 is Adam
CLUSTERING_OPTIMIZER = {"name": "adamw", "lr": 1.0e-4, "weight_decay": 0.0, "schedule": "constant",
                        "warmup_epochs": 0.0}


def random_rotation_batch(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One random quarter turn k per image ([B, C, H, W], labels k [B]): RotNet's task at a quarter of
    its cost (the `rotation_copies: 1` variant)."""
    k = torch.randint(4, (images.shape[0],), generator=generator, device=generator.device).to(images.device)
    every = torch.stack([torch.rot90(images, r, dims=(2, 3)) for r in range(4)])  # [4, B, C, H, W]
    return every[k, torch.arange(images.shape[0], device=images.device)], k


def sslpp_loss(rotation_logits: torch.Tensor, rotation_labels: torch.Tensor, pseudo_logits: torch.Tensor,
               pseudo_labels: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 5: L = L_s + lambda * L_c with L_s the rotation CE (Eq. 3) and L_c the CE on the
    clustering pseudo-labels (Eq. 4). Returns (L, L_s, L_c)."""
    loss_s = F.cross_entropy(rotation_logits, rotation_labels)
    loss_c = F.cross_entropy(pseudo_logits, pseudo_labels)
    return loss_s + weight * loss_c, loss_s, loss_c


CLUSTERING, ROTATION = 0, 1  # stage indices


@register_method("sslpp")
class SSLPlusPlus(SSLMethod):
    display_name = "SSL++ (Rotation)"
    paper = "sslpp"
    version = 2  # v2: two stages with budgets of their own; IIC with two heads, Sobel, weak/strong views
    # IIC trains one head per epoch: DDP must allow parameters without gradients
    has_unused_parameters = True

    class Hparams(IICHparams):
        # IIC's settings (num_clusters 70: Table XIII; num_heads, main_head, sobel, ...: methods/iic.py)
        pseudo_label_weight: float = Field(0.05, ge=0)  # lambda of Eq. 5 (0.05 Rotation/AET, 1 Colorization/Context)
        pseudo_labels_upright_only: bool = False  # L_c on the 0-degree copies only (default: all copies)
        # 4: the four rotations of the first view (RotNet, the paper); 1: one random rotation of each view
        rotation_copies: Literal[1, 4] = 4
        # the clustering stage's budget (SSL++ gives none; IIC's code: 2000 epochs, 220 images x 3 pairs);
        # None = the method's epochs / batch size
        clustering_epochs: int | None = Field(None, ge=1)
        clustering_batch_size: int | None = Field(None, ge=2)
        # the clustering stage's optimizer: keys over IIC's Adam lr 1e-4, constant (not over the method's
        # optimizer, which is the Rotation stage's)
        clustering_optimizer: dict[str, Any] = Field(default_factory=lambda: dict(CLUSTERING_OPTIMIZER))
        # the clustering stage's view specs (augment.views entries: weak view first, then the strong ones);
        # None = the method's views
        clustering_views: list[dict[str, Any]] | None = None

        @field_validator("clustering_optimizer")
        @classmethod
        def _optimizer(cls, value: dict[str, Any]) -> dict[str, Any]:
            merged = {**CLUSTERING_OPTIMIZER, **value}
            validate_nested(OptimizerConfig, merged)  # the error names clustering_optimizer.<key>
            return merged

        @field_validator("clustering_views")
        @classmethod
        def _views(cls, value):
            if value is not None and not value:
                raise ValueError("needs at least one view spec (or leave it out: the method's views)")
            return value

    def __init__(self, backbone, data, hparams=None):
        super().__init__(backbone, data, hparams)
        hp = self.hparams
        # stage 1: its own copy of the backbone (starts from the same random weights)
        self.clustering = ClusteringModel(copy.deepcopy(backbone), data.num_classes, hp)
        # stage 2: V1 (rotation) and V2 (pseudo-labels) on the representation model f_theta
        self.rotation_head = nn.Linear(backbone.feature_dim, 4)
        self.pseudo_label_head = nn.Linear(backbone.feature_dim, hp.num_clusters)
        self.register_buffer("pseudo_labels", torch.full((data.num_train,), -1, dtype=torch.long))

    def check_hparams(self):
        hp = self.hparams
        self.require(not (hp.pseudo_labels_upright_only and hp.rotation_copies == 1), "pseudo_labels_upright_only",
                     "needs rotation_copies: 4 (with one random rotation a batch may have no upright copy)")

    # -- the two stages --------------------------------------------------------------------------
    def stages(self, settings) -> list[Stage]:
        """[clustering (IIC's budget from the hparams), rotation (the method's epochs, batch, optimizer)]."""
        hp = self.hparams
        where = f"methods.{getattr(settings, 'name', self.name)}"
        augment = settings.augment
        if hp.clustering_views is not None:
            # validated with the suite's own view model (methods/ imports nothing from benchmarks/)
            view_model = type(augment.views[0])
            views = [validate(view_model, v, f"{where}.clustering_views[{i}]") for i, v in
                     enumerate(hp.clustering_views)]
            augment = augment.model_copy(update={"views": views})
        optimizer = validate(OptimizerConfig, hp.clustering_optimizer, f"{where}.clustering_optimizer")
        return [Stage("clustering", hp.clustering_epochs or settings.epochs,
                      hp.clustering_batch_size or settings.batch_size, optimizer, augment),
                Stage("rotation", settings.epochs, settings.batch_size, settings.optimizer, settings.augment)]

    def _stage_modules(self, index: int) -> list[nn.Module]:
        if index == CLUSTERING:
            return [self.clustering]
        return [self.backbone, self.rotation_head, self.pseudo_label_head]

    def set_stage(self, index: int) -> None:
        """Only stage `index`'s model trains: the other's parameters are frozen (requires_grad False), so
        the optimizer built for the stage holds only its own (no update, decay or momentum elsewhere)."""
        if index not in (CLUSTERING, ROTATION):
            raise ConfigError(f"methods.{self.name}: no stage {index}; SSL++ has stages 0 (clustering), 1 (rotation)")
        super().set_stage(index)
        for stage in (CLUSTERING, ROTATION):
            for module in self._stage_modules(stage):
                module.requires_grad_(stage == index)

    def monitored_backbone(self) -> nn.Module:
        # stage 1 trains Phi's trunk and leaves the representation model at its random weights: follow the
        # network that is learning (the evaluated backbone is stage 2's)
        return self.clustering.backbone if self.stage == CLUSTERING else self.backbone

    def on_train_epoch_start(self, ctx: EpochContext) -> dict[str, float]:
        if ctx.stage != ROTATION or not bool((self.pseudo_labels < 0).any()):
            return {}
        # first epoch of stage 2 (a resumed stage 2 has them in its checkpoint): z_n from stage 1's model
        labels = ctx.predict(self.clustering.overcluster_logits).argmax(dim=1)
        self.pseudo_labels.copy_(labels.to(self.pseudo_labels.device))
        logs = {"pseudo_label_clusters": float(torch.unique(labels).numel())}
        if ctx.labels is not None and bool((ctx.labels >= 0).any()):
            from ssl_common.clustering_metrics import labelled_nmi  # scikit-learn: imported when needed

            logs["pseudo_label_nmi"] = labelled_nmi(ctx.labels.cpu().numpy(), labels.cpu().numpy())
        return logs

    def training_loss(self, batch: TrainBatch):
        if batch.stage == CLUSTERING:
            return self.clustering.loss(batch.views, batch.epoch)
        if bool((self.pseudo_labels < 0).any()):
            raise RuntimeError("SSL++ stage 2 needs the stage-1 pseudo-labels (computed at the epoch start)")
        targets = self.pseudo_labels[batch.indices.to(self.pseudo_labels.device)]
        if self.hparams.rotation_copies == 4:  # RotNet's input: the four rotated copies of one view
            rotated, rotation_labels = rotation_batch(batch.views[0])
        else:
            pairs = [random_rotation_batch(view, batch.generator) for view in batch.views]
            rotated, rotation_labels = torch.cat([r for r, _ in pairs]), torch.cat([k for _, k in pairs])
        features = self.backbone(rotated)
        upright = rotation_labels == 0
        pseudo_features = features[upright] if self.hparams.pseudo_labels_upright_only else features
        pseudo_targets = targets.repeat(len(features) // len(targets))  # copies are stacked image-minor
        pseudo_targets = pseudo_targets[upright] if self.hparams.pseudo_labels_upright_only else pseudo_targets
        loss, loss_s, loss_c = sslpp_loss(self.rotation_head(features), rotation_labels,
                                          self.pseudo_label_head(pseudo_features), pseudo_targets,
                                          self.hparams.pseudo_label_weight)
        return loss, {"rotation_loss": loss_s.detach(), "pseudo_label_loss": loss_c.detach()}

    @torch.no_grad()
    def cluster_logits(self, images: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Stage 1's heads: [main (K = classes), over-clustering (the pseudo-labels' 70)]."""
        return self.clustering(images)
