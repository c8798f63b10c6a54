"""Backbones: ResNet-18 with the CIFAR stem, ResNet-50, and a small CNN for 8x8/28x28.

Each backbone maps images to a feature vector of size `feature_dim` and exposes its
stage outputs (`forward_stages`) for per-layer probing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from torch import nn

from benchmarks.errors import ConfigError


class Backbone(nn.Module):
    """Base: `stages` applied in order after `stem`, then global average pooling."""

    feature_dim: int
    stage_dims: list[int]

    def __init__(self, stem: nn.Module, stages: list[nn.Module], stage_dims: list[int], in_channels: int):
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.stage_dims = list(stage_dims)
        self.feature_dim = stage_dims[-1]
        self.in_channels = in_channels
        self.pool = nn.AdaptiveAvgPool2d(1)

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"backbone expects images [B, {self.in_channels}, H, W], got {tuple(x.shape)}")

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps after each stage (the last one is the final feature map)."""
        x = self.stem(x)
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.forward_stages(x)[-1]), 1)

    def pooled_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Globally average-pooled stage outputs, for per-layer probes."""
        return [torch.flatten(self.pool(m), 1) for m in self.forward_stages(x)]


def _resnet(name: str, in_channels: int, cifar_stem: bool) -> Backbone:
    net = getattr(torchvision.models, name)(weights=None)
    if cifar_stem:
        # CIFAR variant: 3x3 stride-1 first conv, no max-pool (He et al.; SimCLR's CIFAR setup)
        conv = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        stem = nn.Sequential(conv, net.bn1, net.relu)
    else:
        conv = net.conv1 if in_channels == 3 else nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        stem = nn.Sequential(conv, net.bn1, net.relu, net.maxpool)
    stages = [net.layer1, net.layer2, net.layer3, net.layer4]
    expansion = 4 if name == "resnet50" else 1
    return Backbone(stem, stages, [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion], in_channels)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def small_cnn(in_channels: int = 1, width: int = 32) -> Backbone:
    """A 3-stage CNN for 8x8 digits and 28x28 MNIST (feature size 4*width)."""
    stem = _conv_block(in_channels, width)
    stages = [
        nn.Sequential(_conv_block(width, width), _conv_block(width, width)),
        nn.Sequential(nn.MaxPool2d(2), _conv_block(width, 2 * width), _conv_block(2 * width, 2 * width)),
        nn.Sequential(nn.MaxPool2d(2), _conv_block(2 * width, 4 * width), _conv_block(4 * width, 4 * width)),
    ]
    return Backbone(stem, stages, [width, 2 * width, 4 * width], in_channels)


BACKBONES: dict[str, Callable[..., Backbone]] = {
    "resnet18_cifar": lambda in_channels=3: _resnet("resnet18", in_channels, cifar_stem=True),
    "resnet18": lambda in_channels=3: _resnet("resnet18", in_channels, cifar_stem=False),
    "resnet50": lambda in_channels=3: _resnet("resnet50", in_channels, cifar_stem=False),
    "small_cnn": small_cnn,
}


def build_backbone(name: str, in_channels: int = 3) -> Backbone:
    if name not in BACKBONES:
        raise ConfigError(f"backbone: unknown backbone '{name}'; allowed: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name](in_channels=in_channels)
