"""UIC (Chen et al., "Unsupervised Image Classification for Deep Representation Learning").

A classification network f' = W o f_theta with K outputs is trained like a supervised
classifier on pseudo-labels that it produces itself (sec. 3.2):
  y_n = argmax f'(t1(x_n))                  (Eq. 5, pseudo-label generation)
  min (1/N) sum_n CE(y_n, f'(t2(x_n)))      (Eq. 6, representation learning)
"For efficiency, the forward pass of label generation can reuse the forward results of
representation learning in the previous epoch": each image is forwarded once per epoch
(t2: the suite's first augmented view of this epoch), trained against the label recorded from the previous
epoch's view (t1), and the argmax of this forward becomes its label for the next epoch
(Fig. 1). Hand-written: no library has the label store or the UIC epoch logic.

Sec. 4.2 implementation details: before each epoch, every empty class takes half of the
largest class (random split, repeated until none is empty: `fill_empty_classes`), and the
epoch samples each class equally often (`class_balanced_order`; with repetition for small
classes). Images not visited in an epoch (large classes are subsampled) keep their label.

Linear probe (sec. 5.2, Table 7): "we fix and do not discard MLP-head when linear probing" -- the
probe is trained on the output of the frozen MLP head (the input of the classifier W), not on the
backbone's features: `probe_with_head` (default: on with an MLP head, off with `head: linear`) makes
`probe_features` return it. kNN and k-means still use the backbone's features, like every other method.

Readings (paper = uic.txt; official = HIK-LAB/Unsupervised-Image-Classification @0db8f00; suite = cifar10.yaml
etc.). The paper gives no head sizes, so the head follows the official code; where the paper states a value
(the linear LR decay) the default follows the paper and the official code's reading is the suite variant
`uic/official`:

| setting      | paper                                  | official code                            | suite (`uic` / `uic/official`)  |
|--------------|----------------------------------------|------------------------------------------|---------------------------------|
| K            | 3k for ImageNet-1k (sec. 4.2, Table 1) | 3000 (main.sh L7 `K=3000`)               | 3x the true classes (both)      |
| head         | "ResNet-50 + MLP-head" (sec. 5.2,      | two 1x1 convs 2048 -> 2048 -> 2048, each | `head: official` (both): d -> d |
|              | Table 7), no sizes                     | + BN + ReLU, then Linear(2048, K) with   | -> d (d = backbone width), BN + |
|              |                                        | bias (UIC/models/resnet50.py L182-190)   | ReLU each, then Linear(d, K)    |
| probe        | on the MLP head's output (sec. 5.2)    | Linear(2048, classes) on the head's      | the head's d-wide output (both) |
|              |                                        | output (resnet50.py L193-194, L278-283;  |                                 |
|              |                                        | eval_linear.py L59)                      |                                 |
| LR schedule  | SGD 0.1 "decaying linearly", batch 256 | SGD lr 0.2, batch 1024, cosine to 0 per  | `uic`: linear 0.1 -> 0;         |
|              | (sec. 4.2)                             | epoch (main.sh L10-11, main.py L82-83)   | `uic/official`: cosine 0.2 ->   |
|              |                                        |                                          | 0, scaled by batch / 1024       |
| wd, momentum | 1e-4, 0.9 (sec. 4.2)                   | 1e-4 (main.sh L9 `WD=-4`), 0.9           | 1e-4, 0.9 (both)                |
| augmentation | RRC + flip; + SimCLR jitter/blur for   | RRC + flip, jitter (0.8, 0.8, 0.8, 0.2)  | `uic`: the suite's pipeline;    |
|              | ResNet (sec. 5.1), no strengths        | p 0.8, grey 0.2 (transform.py L5-7),     | `uic/official`: jitter 0.8/0.8/ |
|              |                                        | blur p 0.5, sigma (0.1, 2), one draw per | 0.8/0.2 p 0.8, blur p 0.5 (one  |
|              |                                        | batch (resnet50.py L13, L28-30, L250-252)| draw per image)                 |
| input        | Sobel (AlexNet only), drop-out 0.5     | --                                       | not used (ResNet variant)       |

Choices where the paper is silent:
- First epoch: labels from a forward pass of the initial network over the clean images
  (`init_labels: predict`), then the empty classes are filled; `random` draws uniform
  random labels instead (the public code's choice).
- Head (official code, above): the two 1x1 convolutions act on the pooled 1x1 feature map, so they are
  bias-free Linear layers here, kaiming-normal (fan_out) initialised like the code's convolutions; the
  classifier N(0, 0.01) with zero bias (resnet50.py L203-205). `head: simclr` is the suite's former head
  (SimCLR's Linear-BN-ReLU-Linear d -> d -> 128, then Linear(128, K), probed at 128-d), `head: linear` the
  plain variant (W directly on the backbone features).
- Under DDP the label store stays identical on every rank: each step gathers the
  (index, label) pairs of all ranks before writing them.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from methods import register_method
from methods.base import EpochContext, MethodHparams, SSLMethod, TrainBatch, projection_mlp
from ssl_common.distributed import gather_cat_nograd


def official_head(in_dim: int, width: int) -> nn.Sequential:
    """The official code's MLP head (UIC/models/resnet50.py L182-190): conv1x1(in, 2048)-BN-ReLU-conv1x1(2048,
    2048)-BN-ReLU on the pooled [B, in, 1, 1] map, written as bias-free Linear layers (a 1x1 convolution on a
    1x1 map is a Linear layer); `width` is 2048 there (ResNet-50's width), the backbone's width here. Weights
    kaiming-normal with fan_out and ReLU gain, as the code initialises its convolutions (L198-199)."""
    layers: list[nn.Module] = []
    for cin in (in_dim, width):
        linear = nn.Linear(cin, width, bias=False)
        nn.init.kaiming_normal_(linear.weight, mode="fan_out", nonlinearity="relu")
        layers += [linear, nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def fill_empty_classes(labels: torch.Tensor, num_classes: int, generator: torch.Generator | None = None
                       ) -> torch.LongTensor:
    """UIC sec. 4.2: while a class is empty, split the largest class into two random halves and
    give one half (the smaller one for odd sizes) to the empty class. Returns new labels; the
    input is not modified. Empty classes are filled in increasing order; ties for the largest
    class go to the lowest class index."""
    labels = torch.as_tensor(labels).long().clone()
    if labels.dim() != 1 or ((labels < 0) | (labels >= num_classes)).any():
        raise ValueError(f"labels must be a 1-d tensor of classes in [0, {num_classes})")
    if len(labels) < num_classes:
        raise ValueError(f"cannot fill {num_classes} classes with {len(labels)} samples")
    counts = torch.bincount(labels, minlength=num_classes)
    while bool((counts == 0).any()):
        empty = int((counts == 0).nonzero()[0])
        largest = int(counts.argmax())
        members = (labels == largest).nonzero().squeeze(1)
        moved = members[torch.randperm(len(members), generator=generator)[: len(members) // 2]]
        labels[moved] = empty
        counts[largest] -= len(moved)
        counts[empty] = len(moved)
    return labels


def class_balanced_order(labels: torch.Tensor, generator: torch.Generator | None = None,
                         length: int | None = None) -> torch.LongTensor:
    """An epoch's sample order (`length` indices, default len(labels)) in which every non-empty
    class appears equally often (the remainder of length / classes goes to randomly chosen
    classes, one extra each). A class with fewer members than its share repeats its members
    as evenly as possible (each member t or t+1 times); a larger class is subsampled
    without replacement. The order is shuffled."""
    labels = torch.as_tensor(labels).long()
    length = len(labels) if length is None else length
    classes = torch.unique(labels)
    share = torch.full((len(classes),), length // len(classes), dtype=torch.long)
    share[torch.randperm(len(classes), generator=generator)[: length % len(classes)]] += 1
    parts = []
    for cls, count in zip(classes.tolist(), share.tolist()):
        members = (labels == cls).nonzero().squeeze(1)
        repeats, rest = divmod(count, len(members))
        parts += [members] * repeats
        parts.append(members[torch.randperm(len(members), generator=generator)[:rest]])
    order = torch.cat(parts)
    return order[torch.randperm(len(order), generator=generator)]


def last_write_wins(indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique indices, the value of each index's last occurrence): a deterministic scatter when
    an index occurs twice in a batch (class-balanced epochs repeat images)."""
    unique, inverse = torch.unique(indices, return_inverse=True)
    positions = torch.arange(len(indices), device=indices.device)
    last = torch.full((len(unique),), -1, dtype=torch.long, device=indices.device)
    last = last.scatter_reduce(0, inverse, positions, reduce="amax")
    return unique, values[last]


@register_method("uic")
class UIC(SSLMethod):
    display_name = "UIC"
    paper = "uic"
    # v2: the linear probe on the MLP head's output (sec. 5.2); v3: the official code's full-width head (the
    # default) and the probe on its d-wide output
    version = 3

    class Hparams(MethodHparams):
        num_classes: int | None = Field(None, ge=2)  # K; None = 3 x the true classes (the paper's 3k for ImageNet-1k)
        # official: the official code's head (two full-width layers with BN + ReLU, resnet50.py L182-190);
        # simclr: SimCLR's MLP d -> hidden -> mlp_out_dim; linear: the classifier on the backbone's features
        head: Literal["official", "simclr", "linear"] = "official"
        mlp_hidden_dim: int | None = Field(None, ge=1)  # None = the backbone's feature size (both MLP heads)
        mlp_out_dim: int = Field(128, ge=1)  # `head: simclr` only (the official head's output is full-width)
        init_labels: Literal["predict", "random"] = "predict"  # forward pass of the initial network | random
        class_balanced: bool = True  # sec. 4.2 class-balanced sampling (False: plain random order)
        # sec. 5.2: the linear probe keeps the (frozen) MLP head and reads its output; None = on with the MLP head
        probe_with_head: bool | None = None

    def __init__(self, backbone, data, hparams=None):
        super().__init__(backbone, data, hparams)
        hp = self.hparams
        self.num_classes = hp.num_classes or 3 * data.num_classes
        dim = backbone.feature_dim
        hidden = hp.mlp_hidden_dim or dim
        if hp.head == "official":
            self.head = nn.Sequential(official_head(dim, hidden), nn.Linear(hidden, self.num_classes))
            nn.init.normal_(self.head[1].weight, std=0.01)  # resnet50.py L203-205
            nn.init.zeros_(self.head[1].bias)
        elif hp.head == "simclr":
            self.head = nn.Sequential(projection_mlp(dim, hidden, hp.mlp_out_dim),
                                      nn.Linear(hp.mlp_out_dim, self.num_classes))
        else:
            self.head = nn.Linear(dim, self.num_classes)
        # the label store, indexed by pretraining sample: `pseudo_labels` are this epoch's targets,
        # `next_pseudo_labels` collects this epoch's predictions; buffers, so resumes restore them
        self.register_buffer("pseudo_labels", torch.full((data.num_train,), -1, dtype=torch.long))
        self.register_buffer("next_pseudo_labels", torch.full((data.num_train,), -1, dtype=torch.long))

    def check_hparams(self):
        num_classes = self.hparams.num_classes or 3 * self.data.num_classes
        self.require(self.data.num_train >= num_classes, "num_classes",
                     f"{num_classes} classes need at least as many pretraining images (got {self.data.num_train})")
        self.require(not (self.hparams.probe_with_head and self.hparams.head == "linear"), "probe_with_head",
                     "needs an MLP head (the linear head has no MLP to keep); set probe_with_head: false")

    @property
    def probes_head(self) -> bool:
        hp = self.hparams
        return hp.head != "linear" if hp.probe_with_head is None else hp.probe_with_head

    def probe_features(self, images: torch.Tensor) -> torch.Tensor:
        """sec. 5.2: the probe sees the MLP head's output (the classifier's input) when probe_with_head."""
        features = self.backbone(images)
        return self.head[0](features) if self.probes_head else features

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def on_train_epoch_start(self, ctx: EpochContext) -> dict[str, float]:
        generator = torch.Generator().manual_seed(ctx.seed * 1_000_003 + ctx.epoch * 7_919 + 17)
        if bool((self.pseudo_labels < 0).any()):  # first epoch: no forward results yet
            if self.hparams.init_labels == "predict":
                start = ctx.predict(self.scores).argmax(dim=1).cpu()
            else:
                start = torch.randint(self.num_classes, (len(self.pseudo_labels),), generator=generator)
            previous = None
        else:  # the predictions recorded during the previous epoch become this epoch's labels
            start, previous = self.next_pseudo_labels.cpu(), self.pseudo_labels.cpu().clone()
        empty_before = int((torch.bincount(start, minlength=self.num_classes) == 0).sum())
        filled = fill_empty_classes(start, self.num_classes, generator)
        self.pseudo_labels.copy_(filled.to(self.pseudo_labels.device))
        self.next_pseudo_labels.copy_(self.pseudo_labels)
        logs = {"empty_classes_filled": float(empty_before)}
        if previous is not None:
            logs["label_change"] = float((filled != previous).float().mean())
        if ctx.labels is not None and bool((ctx.labels >= 0).any()):
            from ssl_common.clustering_metrics import labelled_nmi  # scikit-learn: imported when needed

            # the paper's "NMI t/labels" (Table 1): pseudo-labels vs annotated labels
            logs["pseudo_label_nmi"] = labelled_nmi(ctx.labels.numpy(), filled.numpy())
        return logs

    def epoch_order(self, epoch: int, generator: torch.Generator) -> torch.Tensor | None:
        if not self.hparams.class_balanced:
            return None
        return class_balanced_order(self.pseudo_labels.cpu(), generator)

    def training_loss(self, batch: TrainBatch):
        indices = batch.indices.to(self.pseudo_labels.device)
        targets = self.pseudo_labels[indices]
        if bool((targets < 0).any()):
            raise RuntimeError("UIC's label store is empty; on_train_epoch_start must run before training")
        logits = self.scores(batch.views[0])
        loss = F.cross_entropy(logits, targets)
        # Eq. 5 for the next epoch: this forward's argmax, written for every rank's images
        predicted = logits.detach().argmax(dim=1)
        all_indices, all_predicted = gather_cat_nograd(indices), gather_cat_nograd(predicted)
        unique, values = last_write_wins(all_indices, all_predicted)
        self.next_pseudo_labels[unique] = values
        accuracy = (predicted == targets).float().mean()
        return loss, {"pseudo_label_accuracy": accuracy}

    @torch.no_grad()
    def cluster_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.scores(images)
