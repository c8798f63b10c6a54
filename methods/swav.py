"""SwAV (Caron et al., 2020): swapped prediction of Sinkhorn-Knopp codes.

The dissertation (carl-carp-dissertation.txt sec. 5.8.5, 5.7.1) "kept official hyperparameters" and
changed only the prototypes: K = 100 on CIFAR-10, 300 on CIFAR-100/STL-10. Official values are those
of facebookresearch/swav main_swav.py and its batch-256 script (swav_200ep_bs256_pretrain.sh):

| setting                  | official (code + SwAV paper sec. 4, A.1)             | suite                             |
|--------------------------|------------------------------------------------------|-----------------------------------|
| prototypes K             | 3000                                                 | 100 / 300 (diss. sec. 5.8.5)      |
| Sinkhorn eps / iters     | 0.05 / 3                                             | 0.05 / 3                          |
| temperature              | 0.1                                                  | 0.1                               |
| projection head          | 2048 -> 128 with BN (diss.: 512 -> 128, sec. 5.8.2)  | lightly's, 512 -> 128 with BN     |
| prototypes               | nn.Linear(128, K, bias=False), renormalised per step | lightly's, bias removed           |
| prototype freeze         | first 313 iterations (main_swav.py default; 5005 in  | `freeze_prototypes_steps` (steps):|
|                          | the bs-256 script = 1 ImageNet epoch)                | 313 cifar/stl, 11 (1 epoch) digits|
| queue                    | 3840 embeddings from epoch 15 at bs 256 (bs-256      | `queue_length`/`queue_start_epoch`|
|                          | script); used once full                              | 3840 / 15 cifar/stl; off on digits|
| multi-crop               | 2 x 224 + 6 x 96 (paper sec. 3.2)                    | flag `multi_crop` (off: 2 views)  |
| optimizer                | LARS (trust 0.001), SGD m 0.9, lr 0.6 -> 0.0006      | each suite's `swav.optimizer`     |
|                          | cosine, no warm-up, wd 1e-6 (bs-256 script)          |                                   |

Multi-crop: with `multi_crop: true`, views beyond the first two (the method's `augment` block) are
the low-resolution crops: they predict the codes of the two high-resolution ones but get no codes.
Without it only the first two views are used. The queue holds the l2-normalised embeddings of the two
high-resolution views of earlier batches (per view, newest first, as the official code); their
prototype scores join the batch's in Sinkhorn, and only the batch's codes are kept. Hand-written:
lightly's MemoryBankModule keeps its bank out of the state dict (persistent=False), so a resumed run
would restart with a random queue, and it starts from random vectors where SwAV waits for a full
queue. Prototypes are frozen by lightly's SwaVPrototypes (no gradient for the first steps: no
update, momentum or weight decay); loss and Sinkhorn from lightly (over the global batch under DDP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.loss import SwaVLoss
from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
from pydantic import Field

from methods import register_method
from methods.base import MethodHparams, SSLMethod, TrainBatch

NUM_HIGH_RES = 2  # SwAV's crops_for_assign: the two high-resolution views get codes


@register_method("swav")
class SwAV(SSLMethod):
    display_name = "SwAV"
    paper = "carl-carp-dissertation"
    version = 2  # v2: bias-free prototypes, prototype freeze in steps, queue, multi-crop flag

    class Hparams(MethodHparams):
        num_prototypes: int = Field(100, ge=2)  # dissertation sec. 5.8.5: 100 CIFAR-10, 300 CIFAR-100/STL-10
        hidden_dim: int = Field(512, ge=1)
        output_dim: int = Field(128, ge=1)
        temperature: float = Field(0.1, gt=0)
        sinkhorn_iterations: int = Field(3, ge=1)
        sinkhorn_epsilon: float = Field(0.05, gt=0)
        freeze_prototypes_steps: int = Field(313, ge=0)  # optimizer steps (main_swav.py freeze_prototypes_niters)
        queue_length: int = Field(0, ge=0)  # embeddings per high-resolution view; 0 = no queue
        queue_start_epoch: int = Field(15, ge=0)  # epoch_queue_starts
        multi_crop: bool = False  # views beyond the first two are low-resolution crops

    def __init__(self, backbone, data, hparams=None):
        super().__init__(backbone, data, hparams)
        hp = self.hparams
        self.projection_head = SwaVProjectionHead(backbone.feature_dim, hp.hidden_dim, hp.output_dim)
        self.prototypes = SwaVPrototypes(hp.output_dim, hp.num_prototypes, hp.freeze_prototypes_steps)
        for layer in self.prototypes.heads:  # official: nn.Linear(128, K, bias=False) (src/resnet50.py)
            layer.register_parameter("bias", None)
        self.prototypes.normalize()  # on the unit sphere from the start (renormalised every step)
        self.criterion = SwaVLoss(hp.temperature, hp.sinkhorn_iterations, hp.sinkhorn_epsilon,
                                  sinkhorn_gather_distributed=True)
        # frozen prototypes get no gradient in the first steps: DDP must allow unused parameters
        self.has_unused_parameters = hp.freeze_prototypes_steps > 0
        # the queue (a buffer: saved in checkpoints, so a resume continues with it)
        self.register_buffer("queue", torch.zeros(NUM_HIGH_RES, hp.queue_length, hp.output_dim))

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection_head(self.backbone(x)), dim=1)

    def _queue_scores(self, epoch: int) -> list[torch.Tensor] | None:
        """Prototype scores of the queued embeddings, once the queue is running and full (official:
        used when its last row is non-zero)."""
        if self.hparams.queue_length == 0 or epoch < self.hparams.queue_start_epoch:
            return None
        if bool((self.queue[:, -1] == 0).all()):
            return None
        with torch.no_grad():
            return [self.prototypes.heads[0](q) for q in self.queue]

    @torch.no_grad()
    def _enqueue(self, embeddings: list[torch.Tensor], epoch: int) -> None:
        if self.hparams.queue_length == 0 or epoch < self.hparams.queue_start_epoch:
            return
        for i, z in enumerate(embeddings):
            z = z.detach()[: self.hparams.queue_length].to(self.queue.dtype)
            # newest first: shift the queue by the batch, the batch goes in front (main_swav.py L300-302)
            self.queue[i] = torch.cat([z, self.queue[i, : self.hparams.queue_length - len(z)]])

    def training_loss(self, batch: TrainBatch):
        hp = self.hparams
        if hp.multi_crop and len(batch.views) <= NUM_HIGH_RES:
            raise ValueError(f"methods.{self.name}.multi_crop: needs views beyond the first two (the low-resolution "
                             f"crops, e.g. a second view spec in the method's augment block); got "
                             f"{len(batch.views)} views")
        views = batch.views if hp.multi_crop else batch.views[:NUM_HIGH_RES]
        # renormalise the prototypes in place before use (SwAV's recipe)
        self.prototypes.normalize()
        embeddings = [self._embed(v) for v in views]
        scores = [self.prototypes(z, batch.step) for z in embeddings]  # frozen for the first steps
        loss = self.criterion(scores[:NUM_HIGH_RES], scores[NUM_HIGH_RES:],
                              queue_outputs=self._queue_scores(batch.epoch))
        self._enqueue(embeddings[:NUM_HIGH_RES], batch.epoch)
        return loss, {}

    @torch.no_grad()
    def cluster_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.prototypes.heads[0](self._embed(images))
