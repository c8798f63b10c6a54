"""Baselines: BYOL's loss against 2 - 2cos by hand, SimCLR's head, SwAV's frozen prototypes, queue and crops."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from methods.byol import byol_loss
from tests.helpers import random_batch, tiny_method

# -- BYOL -------------------------------------------------------------------------------------------------

def _cos(u, v):
    return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u)) / math.sqrt(sum(b * b for b in v))


Q_A, Q_B = [[1.0, 0.0, 2.0], [0.5, -1.0, 0.0]], [[0.0, 3.0, 1.0], [2.0, 2.0, -1.0]]
Z_A, Z_B = [[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]], [[1.0, 0.0, 0.0], [-1.0, 0.5, 2.0]]


def test_byol_loss_is_the_sum_of_both_directions_of_2_minus_2cos_batch_mean():
    assert list(inspect.signature(byol_loss).parameters) == ["pred_a", "pred_b", "target_a", "target_b"]
    want = sum((2 - 2 * _cos(Q_A[i], Z_B[i])) + (2 - 2 * _cos(Q_B[i], Z_A[i])) for i in range(2)) / 2
    got = byol_loss(*(torch.tensor(x, dtype=torch.float64) for x in (Q_A, Q_B, Z_A, Z_B)))
    assert got.item() == pytest.approx(want, rel=1e-12)
    # = || q/|q| - z/|z| ||^2 summed over the two directions (BYOL's regression loss)
    q, z = torch.tensor(Q_A[0]), torch.tensor(Z_B[0])
    assert (q / q.norm() - z / z.norm()).pow(2).sum().item() == pytest.approx(2 - 2 * _cos(Q_A[0], Z_B[0]), rel=1e-6)
    # aligned predictions cost nothing, opposite ones 8 (4 per direction)
    same = torch.tensor([[1.0, 2.0, 3.0]])
    assert byol_loss(same, same, 2 * same, 3 * same).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(same, same, -same, -same).item() == pytest.approx(8.0, abs=1e-6)


def test_byol_targets_get_no_gradient_and_predictions_get_the_hand_gradient():
    q_a, q_b, z_a, z_b = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (Q_A, Q_B, Z_A, Z_B))
    byol_loss(q_a, q_b, z_a, z_b).backward()
    assert z_a.grad is None and z_b.grad is None
    # d/dq of -2 cos(q, z) / N: -2/N * (z/|z| - cos * q/|q|) / |q|
    q, z = q_a.detach()[0], z_b.detach()[0]
    cos = (q @ z) / q.norm() / z.norm()
    want = -2 / 2 * (z / z.norm() - cos * q / q.norm()) / q.norm()
    torch.testing.assert_close(q_a.grad[0], want)


def test_byol_trains_with_the_papers_loss():
    method = tiny_method("byol", {"hidden_dim": 16, "output_dim": 8}, num_train=64)
    assert method.hparams.momentum_base == 0.996  # BYOL sec. 3.2
    method.eval()
    batch = random_batch(view_seed=1000)
    loss, _ = method.training_loss(batch)
    x_a, x_b = batch.views
    with torch.no_grad():
        want = byol_loss(method._online(x_a), method._online(x_b), method._target(x_a), method._target(x_b))
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert 0.0 <= loss.item() <= 8.0


# -- SimCLR -----------------------------------------------------------------------------------------------

def test_simclr_projection_head_has_no_batch_norm():
    method = tiny_method("simclr", {"hidden_dim": 32, "output_dim": 8}, num_train=64, seed=None)
    layers = list(method.projection_head.layers)
    assert [type(m).__name__ for m in layers] == ["Linear", "ReLU", "Linear"]  # sec. 5.8.2: BN only for the others
    assert (layers[0].in_features, layers[0].out_features, layers[2].out_features) == (16, 32, 8)


# -- SwAV -------------------------------------------------------------------------------------------------

def _swav(**hparams):
    hparams = {"num_prototypes": 6, "hidden_dim": 16, "output_dim": 8, **hparams}
    return tiny_method("swav", hparams, num_train=64)


def _train(method, steps, epoch=0, views=2, lr=0.5):
    optimizer = torch.optim.SGD([p for p in method.parameters()], lr=lr, momentum=0.9, weight_decay=0.1)
    prototypes = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        batch = random_batch(views=views, view_seed=1000 + step, step=step, epoch=epoch)
        loss, _ = method.training_loss(batch)
        loss.backward()
        optimizer.step()
        prototypes.append(method.prototypes.heads[0].weight.detach().clone())
    return prototypes


def test_swav_prototypes_stay_unchanged_during_the_frozen_steps_then_train():
    method = _swav(freeze_prototypes_steps=3)
    assert method.prototypes.heads[0].bias is None  # official: nn.Linear(128, K, bias=False)
    assert method.has_unused_parameters  # DDP must allow the frozen prototypes
    start = method.prototypes.heads[0].weight.detach().clone()
    torch.testing.assert_close(start.norm(dim=1), torch.ones(6))  # on the unit sphere from the start
    head_before = method.projection_head.layers[0].weight.detach().clone()
    after = _train(method, 5)
    for step in range(3):  # steps 0, 1, 2: no gradient, so no update, momentum or weight decay
        torch.testing.assert_close(after[step], start, atol=1e-6, rtol=0)
    assert (after[4] - start).abs().max() > 1e-3  # trained from step 3 on
    assert not torch.equal(method.projection_head.layers[0].weight, head_before)  # the rest trains all along
    # without a freeze the very first step moves them
    free = _swav(freeze_prototypes_steps=0)
    start = free.prototypes.heads[0].weight.detach().clone()
    assert (_train(free, 1)[0] - start).abs().max() > 1e-3


def test_swav_queue_fills_newest_first_and_joins_sinkhorn_once_full():
    from lightly.loss.swav_loss import sinkhorn

    method = _swav(freeze_prototypes_steps=0, queue_length=16, queue_start_epoch=1)
    method.eval()  # fixed BN statistics: the same batch gives the same embeddings
    before = method.queue.clone()
    method.training_loss(random_batch(view_seed=1000))
    assert torch.equal(method.queue, before)  # not before queue_start_epoch
    for step in range(3):  # batches of 8: full after two steps
        batch = random_batch(view_seed=1000 + step, step=step, epoch=1)
        with torch.no_grad():
            newest = [method._embed(v) for v in batch.views]
            scores = [method.prototypes.heads[0](z) for z in newest]
        queued = method._queue_scores(1)
        assert (queued is None) == (step < 2)
        loss = method.training_loss(batch)[0]
        # lightly's SwaVLoss with the queued scores appended to Sinkhorn's input
        assert loss.item() == pytest.approx(method.criterion(scores, [], queue_outputs=queued).item(), rel=1e-6)
        torch.testing.assert_close(method.queue[0, :8], newest[0])
        torch.testing.assert_close(method.queue[1, :8], newest[1])
    # the queue changes the codes of the batch
    with_queue = sinkhorn(torch.cat([scores[0], queued[0]]), 3, 0.05)[:8]
    assert (with_queue - sinkhorn(scores[0], 3, 0.05)).abs().max() > 1e-5  # (near-identical random embeddings)
    assert "queue" in method.state_dict()  # checkpointed: a resume continues with the same queue


def test_swav_multi_crop_flag_uses_the_extra_views_as_low_resolution_crops():
    def loss_and_view_grads(method, views):
        batch = random_batch(views=views, view_seed=1000)
        batch.views = [v.requires_grad_() for v in batch.views]
        loss = method.training_loss(batch)[0]
        loss.backward()
        return loss, batch, [v.grad for v in batch.views]

    method = _swav(freeze_prototypes_steps=0)
    method.eval()
    _, _, grads = loss_and_view_grads(method, 4)
    assert grads[2] is None and grads[3] is None  # flag off: only the first two views
    multi = _swav(freeze_prototypes_steps=0, multi_crop=True)
    multi.load_state_dict(method.state_dict())
    multi.eval()
    loss, batch, grads = loss_and_view_grads(multi, 4)
    assert grads[2].abs().sum() > 0 and grads[3].abs().sum() > 0
    with torch.no_grad():
        scores = [multi.prototypes.heads[0](multi._embed(v)) for v in batch.views]
    assert loss.item() == pytest.approx(multi.criterion(scores[:2], scores[2:]).item(), rel=1e-6)
    with pytest.raises(ValueError, match="methods.swav.multi_crop"):
        multi.training_loss(random_batch(view_seed=1000))
