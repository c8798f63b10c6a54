"""RotNet's NIN backbone (block shapes, parameter count, small inputs) and the Rotation method
(rotated copies, the 4-way loss, a training step)."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.backbones import build_backbone, small_cnn
from benchmarks.errors import ConfigError
from methods import get_method
from methods.base import DataInfo, TrainBatch
from methods.rotation import Rotation, rotation_batch, rotation_loss

# ----------------------------------------------------------------------------- NIN


@pytest.mark.parametrize("channels, size, shapes", [
    # RotNet's CIFAR config: max-pool after block 1, avg-pool after block 2, none after 3 and 4
    (3, 32, [(96, 16, 16), (192, 8, 8), (192, 8, 8), (192, 8, 8)]),
    (1, 28, [(96, 14, 14), (192, 7, 7), (192, 7, 7), (192, 7, 7)]),
    # 8x8 digits: the map is already 8x8, so the pooling is skipped
    (1, 8, [(96, 8, 8), (192, 8, 8), (192, 8, 8), (192, 8, 8)]),
])
def test_nin_block_shapes(channels, size, shapes):
    torch.manual_seed(0)
    net = build_backbone("nin", channels).eval()
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        maps = net.forward_stages(x)
        features = net(x)
    assert [tuple(m.shape[1:]) for m in maps] == shapes
    assert net.feature_dim == 192 and net.stage_dims == [96, 192, 192, 192]
    torch.testing.assert_close(features, maps[-1].mean(dim=(2, 3)))


def test_nin_parameter_count_by_hand():
    # conv weights (no bias) + BN affine (2 per channel), RotNet's 192/160/96 widths
    block1 = 5 * 5 * 3 * 192 + 192 * 160 + 160 * 96 + 2 * (192 + 160 + 96)
    block2 = 5 * 5 * 96 * 192 + 2 * 192 * 192 + 2 * 3 * 192
    block34 = 3 * 3 * 192 * 192 + 2 * 192 * 192 + 2 * 3 * 192
    net = build_backbone("nin", 3)
    assert sum(p.numel() for p in net.parameters()) == block1 + block2 + 2 * block34
    grey = build_backbone("nin", 1)
    assert sum(p.numel() for p in net.parameters()) - sum(p.numel() for p in grey.parameters()) == 5 * 5 * 2 * 192


# ----------------------------------------------------------------------------- Rotation


def test_rotation_batch_by_hand():
    images = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[5.0, 6.0], [7.0, 8.0]]]])  # [2, 1, 2, 2]
    rotated, labels = rotation_batch(images)
    # torch.rot90 turns counter-clockwise: [[a, b], [c, d]] -> [[b, d], [a, c]]
    expected = [
        [[1, 2], [3, 4]], [[5, 6], [7, 8]],  # k = 0
        [[2, 4], [1, 3]], [[6, 8], [5, 7]],  # k = 1 (90 degrees)
        [[4, 3], [2, 1]], [[8, 7], [6, 5]],  # k = 2 (180)
        [[3, 1], [4, 2]], [[7, 5], [8, 6]],  # k = 3 (270)
    ]
    assert rotated.shape == (8, 1, 2, 2)
    assert rotated[:, 0].tolist() == expected
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="square"):
        rotation_batch(torch.zeros(1, 1, 2, 3))


def test_rotation_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 3])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 3)) - math.log(1 / (math.e + 3))) / 2
    assert rotation_loss(logits, labels).item() == pytest.approx(expected)


@pytest.mark.parametrize("backbone_name", ["small_cnn", "nin"])
def test_rotation_training_step(backbone_name):
    torch.manual_seed(0)
    backbone = small_cnn(in_channels=1, width=4) if backbone_name == "small_cnn" else build_backbone("nin", 1)
    assert get_method("rotation") is Rotation
    method = Rotation(backbone, DataInfo(num_classes=3, num_train=4, in_channels=1, image_size=8))
    assert Rotation.display_name == "Rotation" and Rotation.paper == "sslpp"
    views = [torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)]
    batch = TrainBatch(views, torch.arange(2), None, 0, 0, 1, torch.Generator().manual_seed(0))
    loss, logs = method.training_loss(batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert 0.0 <= float(logs["rotation_acc"]) <= 1.0
    loss.backward()
    grads = [p.grad for p in backbone.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert method.rotation_head.weight.grad is not None
    assert method.cluster_logits(views[0]) is None
    with pytest.raises(ConfigError, match="methods.rotation.views"):  # no hyperparameters of its own
        Rotation(backbone, DataInfo(num_classes=3, num_train=4, in_channels=1, image_size=8), {"views": 2})
