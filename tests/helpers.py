"""Builders the method tests share: a registered method on a tiny CNN, and a TrainBatch of 1x8x8 images.

Import them as `from tests.helpers import ...` (tests/conftest.py puts the repository root on sys.path,
whatever pytest's import mode). A test file binds its own sizes and seeds once, e.g.
`_method = functools.partial(tiny_method, num_classes=10, num_train=100, width=8, seed=None)`.
"""

from __future__ import annotations

import torch

from benchmarks.backbones import small_cnn
from methods import get_method
from methods.base import DataInfo, TrainBatch


def tiny_method(name: str, hparams=None, *, num_classes: int = 3, num_train: int = 12, width: int = 4,
                seed: int | None = 0):
    """Method `name` (its `hparams` mapping) on `small_cnn(1, width)` for `num_train` 1x8x8 images of
    `num_classes` classes; torch's global generator is seeded with `seed` first (None: left alone)."""
    if seed is not None:
        torch.manual_seed(seed)
    data = DataInfo(num_classes=num_classes, num_train=num_train, in_channels=1, image_size=8)
    return get_method(name)(small_cnn(1, width=width), data, hparams)


def train_batch(views: list[torch.Tensor], indices: torch.Tensor | None = None, *, epoch: int = 0,
                step: int = 0, max_epochs: int = 10, generator_seed: int = 0, stage: int = 0) -> TrainBatch:
    """A TrainBatch of these views: dataset `indices` (default 0..n-1), no labels, a generator seeded with
    `generator_seed`."""
    if indices is None:
        indices = torch.arange(len(views[0]))
    generator = torch.Generator().manual_seed(generator_seed)
    return TrainBatch(views, indices, None, epoch, step, max_epochs, generator, stage)


def random_batch(n: int = 8, views: int = 2, *, view_seed: int = 0, **batch) -> TrainBatch:
    """`train_batch` of `views` views, each n standard-normal 1x8x8 images drawn from one generator seeded
    with `view_seed`; `batch`: train_batch's keywords (epoch, step, max_epochs, generator_seed, stage)."""
    gen = torch.Generator().manual_seed(view_seed)
    return train_batch([torch.randn(n, 1, 8, 8, generator=gen) for _ in range(views)], **batch)
