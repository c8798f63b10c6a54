"""Backbones: feature sizes, stage shapes, and parameter counts checked against torchvision's ResNets."""

from __future__ import annotations

import pytest
import torch
import torchvision

from benchmarks.backbones import BACKBONES, build_backbone
from benchmarks.errors import ConfigError


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name, channels, size, feature_dim, stages", [
    # CIFAR stem: 3x3 stride 1, no max-pool -> 32, 16, 8, 4
    ("resnet18_cifar", 3, 32, 512, [(64, 32), (128, 16), (256, 8), (512, 4)]),
    # ImageNet stem: stride 2 conv + max-pool -> /4, then /2 per stage; bottleneck width x4
    ("resnet50", 3, 64, 2048, [(256, 16), (512, 8), (1024, 4), (2048, 2)]),
    ("small_cnn", 1, 8, 128, [(32, 8), (64, 4), (128, 2)]),
    ("small_cnn", 1, 28, 128, [(32, 28), (64, 14), (128, 7)]),
])
def test_feature_dim_and_stage_shapes(name, channels, size, feature_dim, stages):
    torch.manual_seed(0)
    net = build_backbone(name, channels).eval()
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        maps = net.forward_stages(x)
        features = net(x)
        pooled = net.pooled_stages(x)
    assert net.feature_dim == feature_dim and net.stage_dims == [c for c, _ in stages]
    assert [tuple(m.shape) for m in maps] == [(2, c, s, s) for c, s in stages]
    assert tuple(features.shape) == (2, feature_dim)
    # features are the global average of the last stage; pooled stages are each stage's average
    torch.testing.assert_close(features, maps[-1].mean(dim=(2, 3)))
    for m, p in zip(maps, pooled):
        torch.testing.assert_close(p, m.mean(dim=(2, 3)))


def test_resnets_match_torchvision_without_the_classifier():
    fc18 = torchvision.models.resnet18(weights=None).fc
    fc50 = torchvision.models.resnet50(weights=None).fc
    assert n_params(build_backbone("resnet50")) == n_params(torchvision.models.resnet50(weights=None)) - n_params(fc50)
    assert n_params(build_backbone("resnet18")) == n_params(torchvision.models.resnet18(weights=None)) - n_params(fc18)
    # the CIFAR stem swaps the 7x7x3x64 conv for a 3x3x3x64 one
    cifar = n_params(torchvision.models.resnet18(weights=None)) - n_params(fc18) - 7 * 7 * 3 * 64 + 3 * 3 * 3 * 64
    assert n_params(build_backbone("resnet18_cifar")) == cifar


def test_other_input_channels_change_only_the_first_conv():
    grey, rgb = build_backbone("resnet18_cifar", 1), build_backbone("resnet18_cifar", 3)
    assert n_params(rgb) - n_params(grey) == 3 * 3 * 2 * 64
    assert grey(torch.randn(2, 1, 32, 32)).shape == (2, 512)


def test_unknown_backbone_names_the_allowed_ones():
    with pytest.raises(ConfigError, match="backbone: unknown backbone 'resnet19'; allowed: " + ", ".join(sorted(BACKBONES))):
        build_backbone("resnet19")


@pytest.mark.parametrize("name, blocks", [("small_cnn", 3), ("nin", 4), ("resnet18_cifar", 4), ("resnet18", 4),
                                          ("resnet50", 4)])
def test_block_count_and_the_per_block_default(name, blocks):
    from benchmarks.backbones import backbone_blocks, build_backbone, default_blocks

    assert backbone_blocks(name) == blocks == len(build_backbone(name).stage_dims)
    assert default_blocks(blocks) == list(range(2, blocks + 1))
