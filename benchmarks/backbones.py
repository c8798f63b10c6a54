"""Backbones: ResNet-18 with the CIFAR stem, ResNet-50, a small CNN for 8x8/28x28, and RotNet's
Network-In-Network (NIN, the SSL++ paper's CIFAR/STL-10 backbone).

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


# ----------------------------------------------------------------------------- NIN (RotNet)
# Facts from RotNet's official code (gidariss/FeatureLearningRotNet, architectures/NetworkInNetwork.py
# with config/CIFAR10_RotNet_NIN4blocks.py: num_stages 4, use_avg_on_conv3 False), written anew here:
# every conv is conv (bias-free) -> BN -> ReLU, "same" padding, stride 1; 192/160/96 channels.
#   block 1: 5x5 in->192, 1x1 192->160, 1x1 160->96, max-pool 3x3 / 2 (pad 1)
#   block 2: 5x5 96->192, 1x1 192->192, 1x1 192->192, avg-pool 3x3 / 2 (pad 1)
#   blocks 3, 4: 3x3 192->192, 1x1 192->192, 1x1 192->192 (no pooling in the 4-block CIFAR model)
# At 32x32: 96x16x16, 192x8x8, 192x8x8, 192x8x8 (SSL++ Table III: blocks 2-4 are 192x8x8).
# The rotation classifier (RotNet's 'classifier' block: global average pooling + one linear layer)
# is not part of the backbone; methods put their heads on the pooled 192-d features.
NIN_MIN_POOL_SIZE = 8


def _nin_conv(cin: int, cout: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def nin_block(cin: int, widths: tuple[int, int, int], kernel_size: int) -> nn.Sequential:
    """Three conv-BN-ReLU layers: a kernel_size conv, then two 1x1 convs (NIN's "mlpconv")."""
    return nn.Sequential(_nin_conv(cin, widths[0], kernel_size), _nin_conv(widths[0], widths[1], 1),
                         _nin_conv(widths[1], widths[2], 1))


class PoolIfLarger(nn.Module):
    """RotNet's 3x3/2 pooling, skipped when the map is already at most `min_size` on a side.

    RotNet's pooling takes 32x32 CIFAR images to the 8x8 maps of blocks 2-4. On smaller inputs
    (8x8 digits) pooling would leave 2x2 maps, where the 5x5/3x3 convs see mostly padding, so such
    maps keep their size: 8x8 input -> 8x8 maps in every block; 28x28 -> 14x14, 7x7, 7x7, 7x7.
    """

    def __init__(self, pool: nn.Module, min_size: int = NIN_MIN_POOL_SIZE):
        super().__init__()
        self.pool, self.min_size = pool, min_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x) if min(x.shape[-2:]) > self.min_size else x


def nin(in_channels: int = 3) -> Backbone:
    """RotNet's 4-block NIN (see the comment above): stage_dims [96, 192, 192, 192], feature_dim 192
    (global average pooling of block 4)."""
    stages = [
        nn.Sequential(nin_block(in_channels, (192, 160, 96), 5), PoolIfLarger(nn.MaxPool2d(3, stride=2, padding=1))),
        nn.Sequential(nin_block(96, (192, 192, 192), 5), PoolIfLarger(nn.AvgPool2d(3, stride=2, padding=1))),
        nin_block(192, (192, 192, 192), 3),
        nin_block(192, (192, 192, 192), 3),
    ]
    return Backbone(nn.Identity(), stages, [96, 192, 192, 192], in_channels)


BACKBONES: dict[str, Callable[..., Backbone]] = {
    "resnet18_cifar": lambda in_channels=3: _resnet("resnet18", in_channels, cifar_stem=True),
    "resnet18": lambda in_channels=3: _resnet("resnet18", in_channels, cifar_stem=False),
    "resnet50": lambda in_channels=3: _resnet("resnet50", in_channels, cifar_stem=False),
    "small_cnn": small_cnn,
    "nin": nin,
}


def check_backbone_options(name: str, options: dict) -> None:
    """The suite's `backbone_options` are keyword options of the backbone's factory (e.g. small_cnn's width),
    with their types: a bad one names the key and what is allowed."""
    import inspect
    import typing

    from pydantic import create_model

    from ssl_common.typed import StrictModel, validate

    if name not in BACKBONES:
        raise ConfigError(f"backbone: unknown backbone '{name}'; allowed: {', '.join(sorted(BACKBONES))}")
    factory = BACKBONES[name]
    hints = typing.get_type_hints(factory) if not getattr(factory, "__name__", "") == "<lambda>" else {}
    fields = {p.name: (hints.get(p.name, typing.Any), p.default) for p in inspect.signature(factory).parameters.values()
              if p.name != "in_channels"}
    if options and not fields:
        raise ConfigError(f"backbone_options: backbone '{name}' takes no options; got: {', '.join(sorted(options))}")
    validate(create_model(f"{name}_options", __base__=StrictModel, **fields), options, "backbone_options",
             unknown_word=f"option of backbone '{name}'")


def backbone_blocks(name: str, in_channels: int = 3, **options) -> int:
    """How many blocks (stages) the backbone has (small_cnn 3, NIN and the ResNets 4); built on the meta device,
    so no weights are allocated."""
    try:
        with torch.device("meta"):
            return len(build_backbone(name, in_channels, **options).stage_dims)
    except (NotImplementedError, RuntimeError):  # an initialisation the meta device cannot run: build it for real
        return len(build_backbone(name, in_channels, **options).stage_dims)


def default_blocks(num_blocks: int) -> list[int]:
    """The per-block protocols' default blocks: the backbone's blocks from the second on (SSL++ Tables III and V
    probe blocks 2-4 of the 4-block NIN; the first block's features are too low-level to compare methods)."""
    return list(range(2, num_blocks + 1)) or [1]


def build_backbone(name: str, in_channels: int = 3, **options) -> Backbone:
    if name not in BACKBONES:
        raise ConfigError(f"backbone: unknown backbone '{name}'; allowed: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name](in_channels=in_channels, **options)
