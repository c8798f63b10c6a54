"""The `evaluation` section of a suite: one typed model per protocol (pydantic, see ssl_common.typed).

Every method of a suite is evaluated with exactly these settings; they are stored in each run
record beside the metrics they produced, and their canonical dump is part of the record's
fingerprint.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator

from ssl_common.typed import StrictModel

PROTOCOLS = ("knn", "linear", "semi", "transfer", "clustering")


class Budget(StrictModel):
    """A classifier's training budget (linear probe, fine-tuning, transfer probe)."""

    epochs: int = 100
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0

    @field_validator("epochs", "batch_size")
    @classmethod
    def _positive_int(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be a positive integer, got {value!r}")
        return value

    @field_validator("lr")
    @classmethod
    def _lr(cls, value: float) -> float:
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"must be a positive number, got {value}")
        return value

    @field_validator("momentum")
    @classmethod
    def _momentum(cls, value: float) -> float:
        if not 0 <= value < 1:
            raise ValueError(f"must be in [0, 1), got {value}")
        return value

    @field_validator("weight_decay")
    @classmethod
    def _wd(cls, value: float) -> float:
        if value < 0:
            raise ValueError(f"must be >= 0, got {value}")
        return value


class KnnSettings(StrictModel):
    ks: list[int] = Field(default_factory=lambda: [20, 200])
    temperature: float = 0.1

    @field_validator("ks")
    @classmethod
    def _ks(cls, value: list[int]) -> list[int]:
        if not value or any(k < 1 for k in value):
            raise ValueError(f"must be a non-empty list of positive integers, got {value!r}")
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        if not value > 0:
            raise ValueError(f"must be > 0, got {value}")
        return value


class LinearSettings(Budget):
    pass


class SemiSettings(Budget):
    fractions: list[float] = Field(default_factory=lambda: [0.01, 0.1])
    mode: Literal["finetune", "linear"] = "finetune"  # finetune (backbone + head) | linear (probe on the subset)
    views: Literal["crop_flip", "augment", "clean"] = "crop_flip"  # fine-tuning views
    epochs: int = 50
    batch_size: int = 128
    lr: float = 0.05

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if not all(0 < f <= 1 for f in value):
            raise ValueError(f"must be numbers in (0, 1], e.g. [0.01, 0.1]; got {value!r}")
        from benchmarks.evaluation.semi import percent_label

        if len({percent_label(f) for f in value}) != len(value):
            raise ValueError(f"duplicate fractions in {value!r}")
        return value


class TransferSettings(Budget):
    targets: list[str] = Field(default_factory=list)  # dataset loader names, e.g. [cifar100]
    epochs: int = 50

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

    niter: int = 100
    nredo: int = 5
    spherical: bool = False

    @field_validator("niter", "nredo")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be a positive integer, got {value!r}")
        return value


class EvaluationConfig(StrictModel):
    # transfer runs only for the targets listed under transfer.targets
    protocols: list[str] = Field(default_factory=lambda: ["knn", "linear", "semi", "clustering", "transfer"])
    batch_size: int = 512  # inference batch for feature extraction and test predictions
    per_layer: bool = False  # also kNN (k=20) and linear probes on every backbone stage
    knn: KnnSettings = Field(default_factory=KnnSettings)
    linear: LinearSettings = Field(default_factory=LinearSettings)
    semi: SemiSettings = Field(default_factory=SemiSettings)
    transfer: TransferSettings = Field(default_factory=TransferSettings)
    clustering: ClusteringSettings = Field(default_factory=ClusteringSettings)

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be >= 1, got {value}")
        return value

    @field_validator("protocols")
    @classmethod
    def _protocols(cls, value: list[str]) -> list[str]:
        unknown = [p for p in value if p not in PROTOCOLS]
        if unknown:
            raise ValueError(f"unknown protocol '{unknown[0]}'; allowed: {', '.join(PROTOCOLS)}")
        if len(set(value)) != len(value):
            raise ValueError(f"a protocol is listed twice in {value}")
        return value
