"""IIC (methods/iic.py): its two heads and their alternation, the Sobel input by hand, weak/strong pairing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.backbones import build_backbone
from benchmarks.errors import ConfigError
from methods.iic import SobelInput, iic_loss, sobel_filter, with_input_channels
from tests.helpers import random_batch, tiny_method


def _iic(**hparams):
    return tiny_method("iic", {"num_clusters": 7, "num_heads": 2, **hparams}, num_train=40)


def test_two_heads_main_with_k_classes_and_over_clustering_alternate_as_iic():
    method = _iic(overcluster_epochs=1, main_epochs=2, overcluster_first=True)
    heads = method.heads
    assert [h.out_features for h in heads.main.heads] == [3, 3]  # K = the true classes, 2 sub-heads
    assert [h.out_features for h in heads.overcluster.heads] == [7, 7]
    # IIC's CIFAR-10 order: head A (over-clustering) 1 epoch, then head B (main) 2 epochs, repeated
    assert [heads.active(e) for e in range(6)] == ["overcluster", "main", "main"] * 2
    other = _iic(overcluster_epochs=1, main_epochs=1, overcluster_first=False).heads
    assert [other.active(e) for e in range(4)] == ["main", "overcluster"] * 2
    assert {_iic(main_head=False).heads.active(e) for e in range(4)} == {"overcluster"}
    # cluster_logits: [main, over-clustering], each head's best sub-head; the main head alone has K = 3
    method.eval()
    images = torch.randn(5, 1, 8, 8)
    heads.main.record_losses(torch.tensor([-0.1, -0.9]))
    logits = method.cluster_logits(images)
    assert [t.shape for t in logits] == [(5, 3), (5, 7)]
    torch.testing.assert_close(logits[0], heads.main.heads[1](method.backbone(images)))
    assert _iic(main_head=False).cluster_logits(images).shape == (5, 7)


def test_an_epoch_trains_only_its_head_with_the_mean_iic_loss_of_its_sub_heads():
    method = _iic(overcluster_epochs=1, main_epochs=2)
    method.eval()  # fixed BN statistics, to recompute the loss by hand
    batch = random_batch(6, 2, view_seed=1, epoch=1)  # epoch 1: the main head
    loss, logs = method.training_loss(batch)
    assert logs["iic_overcluster_head"] == 0.0
    with torch.no_grad():
        fa, fb = (method.backbone(v) for v in batch.views)
        want = sum(iic_loss(F.softmax(h(fa), 1), F.softmax(h(fb), 1)) for h in method.heads.main.heads) / 2
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is None for p in method.heads.overcluster.parameters())  # the other head: no gradient
    assert all(p.grad is not None for p in method.heads.main.parameters())
    assert method.has_unused_parameters


def test_weak_view_is_paired_with_every_strong_view_in_one_joint_distribution():
    method = _iic(main_head=False, num_heads=1)
    method.eval()
    batch = random_batch(6, 4)  # view 0 weak, views 1-3 strong: 3 pairs per image
    loss, _ = method.training_loss(batch)
    head = method.heads.overcluster.heads[0]
    with torch.no_grad():
        weak = F.softmax(head(method.backbone(batch.views[0])), 1)
        strong = [F.softmax(head(method.backbone(v)), 1) for v in batch.views[1:]]
    want = iic_loss(torch.cat([weak] * 3), torch.cat(strong))
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    # not the mean of the three separate pairs: one joint P over all 18 pairs
    separate = sum(iic_loss(weak, s) for s in strong) / 3
    assert want.item() != pytest.approx(separate.item(), rel=1e-4)
    with pytest.raises(ValueError, match="two or more augmented views"):
        method.training_loss(random_batch(6, 1))


def test_sobel_filter_by_hand():
    # a vertical edge (left 0, right 1) and IIC's kernels dx = [[1,0,-1],[2,0,-2],[1,0,-1]], dy = dx^T
    image = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4).view(1, 1, 4, 4)
    out = sobel_filter(image)
    assert out.shape == (1, 2, 4, 4)
    dx, dy = out[0, 0], out[0, 1]
    # cross-correlation, zero padding: at row 1, col 1: sum over the 3x3 window of kernel * pixel
    assert dx[1, 1].item() == pytest.approx(1 * 0 + 0 * 0 - 1 * 1 + 2 * 0 + 0 * 0 - 2 * 1 + 1 * 0 + 0 * 0 - 1 * 1)
    assert dx[1, 2].item() == pytest.approx(-(1 + 2 + 1) * 1 + (1 + 2 + 1) * 0)
    assert dy[1, 1].item() == pytest.approx(0.0)  # no horizontal edge inside
    assert dy[0, 1].item() == pytest.approx(-(1 * 0 + 2 * 0 + 1 * 1))  # the zero padding above row 0
    # RGB: the luma (ITU-R 601) first; a constant image has no edges away from the border
    rgb = torch.rand(2, 3, 5, 5)
    grey = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]).unsqueeze(1)
    torch.testing.assert_close(sobel_filter(rgb), sobel_filter(grey))
    flat = sobel_filter(torch.full((1, 3, 5, 5), 0.7))
    assert flat[:, :, 1:-1, 1:-1].abs().max() < 1e-6


@pytest.mark.parametrize("backbone", ["small_cnn", "nin", "resnet18_cifar"])
def test_sobel_input_gives_the_backbone_two_channels_and_keeps_its_interface(backbone):
    torch.manual_seed(0)
    net = build_backbone(backbone, 3)
    wrapped = SobelInput(net)
    first = next(m for m in wrapped.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 2 and wrapped.net.in_channels == 2
    assert next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d)).in_channels == 3  # original untouched
    assert wrapped.feature_dim == net.feature_dim
    wrapped.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(images), wrapped.net(sobel_filter(images)))
        assert [m.shape[1] for m in wrapped.pooled_stages(images)] == net.stage_dims
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        with_input_channels(torch.nn.Linear(3, 3), 2)


def test_iic_method_with_sobel_trains_on_the_sobel_trunk():
    method = _iic(sobel=True)
    assert isinstance(method.backbone, SobelInput)
    loss, _ = method.training_loss(random_batch(6, 2))
    loss.backward()
    assert method.backbone.net.stem[0].weight.grad.shape[1] == 2  # the 2-channel input conv trains


def test_invalid_hparams_name_the_key():
    for hparams, key in [({"overcluster_epochs": 0}, "overcluster_epochs"), ({"num_clusters": 1}, "num_clusters"),
                         ({"sobel": "yes"}, "sobel")]:
        with pytest.raises(ConfigError, match=rf"methods\.iic\.{key}"):
            _iic(**hparams)
