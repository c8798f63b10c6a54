"""A whole method under DDP: 2 gloo ranks fed identical views give the loss and the parameter gradients of one
device fed the two ranks' batches side by side (the views twice).

Identical views make every batch statistic the same on a rank as on the doubled batch (batch norm included),
so any difference is the distributed code's: the gathers of the losses' batch statistics (gather_cat), the
gradient that flows back through them, and DDP's averaging of the ranks' gradients. Each rank runs the method's
own `training_loss` on a TrainBatch, then all-reduces its gradients and divides by the world size, as DDP does.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from benchmarks.config import load_suite
from benchmarks.runner import build_method, load_suite_data
from methods.base import TrainBatch

try:
    from tests import ddp_harness
except ImportError:  # pytest's rootdir-less import mode
    import ddp_harness

METHODS = ("simclr", "self_classifier", "carl", "carp", "swav", "byol")
BATCH = 8


def _method(name: str):
    config = load_suite("digits", {"dataset": {"options": {"test_fraction": 0.75}}})
    pl.seed_everything(0, workers=True, verbose=False)
    method, _ = build_method(config, name, load_suite_data(config))
    method.double().train()
    return method


def _views() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH, 1, 8, 8, generator=generator, dtype=torch.float64) for _ in range(2)]


def _loss_and_grads(method, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
    batch = TrainBatch(views, torch.arange(len(views[0])), None, epoch=5, step=60, max_epochs=20,
                       generator=torch.Generator().manual_seed(2))
    loss, _ = method.training_loss(batch)
    method.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


def _worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    out = {}
    for name in METHODS:
        loss, grads = _loss_and_grads(_method(name), _views())  # every rank: the same views
        for grad in grads.values():
            dist.all_reduce(grad)
            grad /= world
        out[name] = (loss, grads)
    return out


@pytest.fixture(scope="module")
def ranks():
    return ddp_harness.run_distributed(_worker, world_size=2)


@pytest.mark.parametrize("name", METHODS)
def test_two_ranks_with_identical_views_give_the_one_device_loss_and_gradients(ranks, name):
    single_loss, single_grads = _loss_and_grads(_method(name), [torch.cat([v, v]) for v in _views()])
    for rank, result in enumerate(ranks):
        loss, grads = result[name]
        torch.testing.assert_close(loss, single_loss, rtol=1e-9, atol=1e-10, msg=f"rank {rank} loss")
        assert set(grads) == set(single_grads)
        for key, grad in grads.items():
            torch.testing.assert_close(grad, single_grads[key], rtol=1e-7, atol=1e-9,
                                       msg=lambda m, k=key, r=rank: f"rank {r} gradient of {k}: {m}")
