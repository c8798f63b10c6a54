"""The `evaluation` section of a suite: one typed model per protocol (pydantic, see ssl_common.typed).

Every method of a suite is evaluated with exactly these settings; they are stored in each run
record beside the metrics they produced, and their canonical dump is part of the record's
fingerprint.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ssl_common.errors import did_you_mean
from ssl_common.typed import AtLeastOne, Momentum, NonNegativeFloat, PositiveNumber, StrictModel, UnitInterval

PROTOCOLS = ("knn", "linear", "online_linear", "semi", "finetune", "transfer", "clustering", "knn_k10",
             "block_classifier")


class Budget(StrictModel):
    """A classifier's training budget (linear probe, fine-tuning, transfer probe)."""

    # subclasses that change a default restate the constrained type (a bare `int` there would drop it)
    epochs: AtLeastOne = 100
    batch_size: AtLeastOne = 256
    lr: PositiveNumber = 0.1
    momentum: Momentum = 0.9
    weight_decay: NonNegativeFloat = 0.0


class KnnSettings(StrictModel):
    ks: list[int] = Field(default_factory=lambda: [20, 200])
    temperature: PositiveNumber = 0.07  # InstDisc's weighted kNN (Wu et al. 2018), which the papers follow

    @field_validator("ks")
    @classmethod
    def _ks(cls, value: list[int]) -> list[int]:
        if not value or any(k < 1 for k in value):
            raise ValueError(f"must be a non-empty list of positive integers, got {value!r}")
        return value


class LinearSettings(Budget):
    """The offline linear probe on the frozen backbone. views: none = features of the clean images,
    extracted once and standardised with the train split's statistics; crop_flip = the MoCo/dissertation
    protocol: every epoch sees new random-resized crops + horizontal flips (the suite's first view spec
    without colour), features through the frozen backbone (eval mode), standardised with the clean
    train statistics."""

    views: Literal["none", "crop_flip"] = "none"


class OnlineLinearSettings(StrictModel):
    """The online linear probe (solo-learn's): a linear classifier on the stop-gradient backbone features
    of the first augmented view, trained beside pretraining with SGD + momentum 0.9 and the pretraining LR
    schedule, evaluated at the end on the clean test images."""

    lr: PositiveNumber = 0.1
    weight_decay: NonNegativeFloat = 0.0


class SemiSettings(Budget):
    """Class-balanced labelled subsets of the train split, as fractions (1% / 10%, key semi_<p>pct) and/or
    images per class (key semi_<n>perclass). Each subset is drawn once per seed of `subsets` (a seed list
    of its own, independent of the pretraining seed: every method sees the same subsets) and stored;
    a run's metric is the mean over its subsets."""

    fractions: list[float] = Field(default_factory=lambda: [0.01, 0.1])
    per_class: list[int] = Field(default_factory=list)
    subsets: list[int] = Field(default_factory=lambda: [0])
    mode: Literal["finetune", "linear"] = "finetune"  # finetune (backbone + head) | linear (probe on the subset)
    views: Literal["crop_flip", "augment", "clean"] = "crop_flip"  # fine-tuning views
    epochs: AtLeastOne = 50
    batch_size: AtLeastOne = 128
    lr: PositiveNumber = 0.05

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if not all(0 < f <= 1 for f in value):
            raise ValueError(f"must be numbers in (0, 1], e.g. [0.01, 0.1]; got {value!r}")
        from benchmarks.evaluation.semi import percent_label

        if len({percent_label(f) for f in value}) != len(value):
            raise ValueError(f"duplicate fractions in {value!r}")
        return value

    @field_validator("per_class")
    @classmethod
    def _per_class(cls, value: list[int]) -> list[int]:
        if any(n < 1 for n in value) or len(set(value)) != len(value):
            raise ValueError(f"must be distinct positive image counts per class, e.g. [5, 14]; got {value!r}")
        return value

    @field_validator("subsets")
    @classmethod
    def _subsets(cls, value: list[int]) -> list[int]:
        if not value or any(s < 0 for s in value) or len(set(value)) != len(value):
            raise ValueError(f"must be a non-empty list of distinct non-negative seeds, got {value!r}")
        return value


class FinetuneSettings(Budget):
    """Fine-tuning the whole network on 100% of the labelled train split (dissertation Table 5.3,
    key finetune_100pct); views as semi.views."""

    views: Literal["crop_flip", "augment", "clean"] = "crop_flip"
    epochs: AtLeastOne = 50
    batch_size: AtLeastOne = 128
    lr: PositiveNumber = 0.05


class TransferSettings(Budget):
    targets: list[str] = Field(default_factory=list)  # dataset loader names, e.g. [cifar100]
    epochs: AtLeastOne = 50

    @field_validator("targets")
    @classmethod
    def _targets(cls, value: list[str]) -> list[str]:
        from benchmarks.data import LOADERS

        for target in value:
            if target not in LOADERS:
                raise ValueError(f"unknown dataset {target!r}; allowed: {', '.join(sorted(LOADERS))}")
        return value


class ClusteringSettings(StrictModel):
    """FAISS k-means (methods without a head)."""

    niter: AtLeastOne = 100
    nredo: AtLeastOne = 5
    spherical: bool = False


class KnnBlockSettings(StrictModel):
    """SSL++ Table V: kNN with K = 10 neighbours and a plurality vote on each block's average-pooled
    features (keys knn_k10_B<i>, knn_k10_avg)."""

    k: AtLeastOne = 10
    metric: Literal["cosine", "euclidean"] = "cosine"
    blocks: list[int] = Field(default_factory=lambda: [2, 3, 4])

    @field_validator("blocks")
    @classmethod
    def _blocks(cls, value: list[int]) -> list[int]:
        if not value or any(b < 1 for b in value) or value != sorted(set(value)):
            raise ValueError(f"must be increasing block numbers (1 = the first block), got {value!r}")
        return value


class BlockClassifierSettings(Budget):
    """SSL++ Table III: a new NIN block + linear softmax trained on a frozen block's feature maps (keys
    block_classifier_B<i>, block_classifier_avg); Table II's evaluation budget by default."""

    blocks: list[int] = Field(default_factory=lambda: [2, 3, 4])
    epochs: AtLeastOne = 200
    batch_size: AtLeastOne = 128
    lr: PositiveNumber = 0.1
    weight_decay: NonNegativeFloat = 5e-4
    milestones: list[int] = Field(default_factory=lambda: [100, 150])
    gamma: UnitInterval = 0.1
    nesterov: bool = True

    _blocks = field_validator("blocks")(KnnBlockSettings._blocks.__func__)


class EvaluationConfig(StrictModel):
    # transfer runs only for the targets listed under transfer.targets
    protocols: list[str] = Field(default_factory=lambda: ["knn", "linear", "semi", "clustering", "transfer"])
    # which protocols run: knn, linear, online_linear (trained beside pretraining), semi, finetune
    # (finetune_100pct), transfer (the targets listed under transfer.targets), clustering, and the
    # per-block ones knn_k10 and block_classifier (SSL++ Tables III, V)
    batch_size: AtLeastOne = 512  # inference batch for feature extraction and test predictions
    per_layer: bool = False  # also kNN (k=20) and linear probes on every backbone stage
    knn: KnnSettings = Field(default_factory=KnnSettings)
    linear: LinearSettings = Field(default_factory=LinearSettings)
    online_linear: OnlineLinearSettings = Field(default_factory=OnlineLinearSettings)
    semi: SemiSettings = Field(default_factory=SemiSettings)
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings)
    transfer: TransferSettings = Field(default_factory=TransferSettings)
    clustering: ClusteringSettings = Field(default_factory=ClusteringSettings)
    knn_k10: KnnBlockSettings = Field(default_factory=KnnBlockSettings)
    block_classifier: BlockClassifierSettings = Field(default_factory=BlockClassifierSettings)

    @field_validator("protocols")
    @classmethod
    def _protocols(cls, value: list[str]) -> list[str]:
        unknown = [p for p in value if p not in PROTOCOLS]
        if unknown:
            raise ValueError(f"unknown protocol '{unknown[0]}'; allowed: {', '.join(PROTOCOLS)}"
                             f"{did_you_mean(unknown[0], PROTOCOLS)}")
        if len(set(value)) != len(value):
            raise ValueError(f"a protocol is listed twice in {value}")
        return value
