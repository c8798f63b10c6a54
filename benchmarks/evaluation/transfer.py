"""Cross-domain transfer: the backbone pretrained on suite A, linear probe on dataset B.

The target's train and test splits come from `benchmarks.data.load_split` (same data root as
the suite), are brought to the suite's input format -- channels adapted (grey -> RGB by
repetition, RGB -> grey by ITU-R 601-2 luma), resized to the suite's image_size (bilinear,
antialiased) -- and normalised with the suite's normalisation.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.data import ImageDataset, dataset_display_name, load_split

LUMA = (0.299, 0.587, 0.114)


def default_data_root() -> str:
    """The CLI's default: $SSL_BENCH_DATA, else ./data."""
    return os.environ.get("SSL_BENCH_DATA") or "data"


def metric_key(target: str) -> str:
    return f"transfer_linear:{dataset_display_name(target)}"


def load_target(name: str, data_root: str | Path | None) -> tuple[ImageDataset, ImageDataset]:
    root = data_root if data_root is not None else default_data_root()
    return load_split(name, "train", root), load_split(name, "test", root)


def adapt_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """float [B, C, H, W] -> [B, channels, H, W]."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)
    if channels == 1 and x.shape[1] == 3:
        return torch.einsum("c,bchw->bhw", x.new_tensor(LUMA), x)[:, None]
    raise ValueError(f"cannot adapt {x.shape[1]}-channel images to {channels} channels")


def transfer_preprocess(image_size: int, in_channels: int, mean, std) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 target images -> the suite's normalised input format."""

    def preprocess(images: torch.Tensor) -> torch.Tensor:
        x = adapt_channels(images.float().div(255.0), in_channels)
        if x.shape[-2:] != (image_size, image_size):
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        m = x.new_tensor(mean).view(1, -1, 1, 1)
        s = x.new_tensor(std).view(1, -1, 1, 1)
        return (x - m) / s

    return preprocess
