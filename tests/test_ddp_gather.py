"""DDP on 2 CPU processes (gloo, spawn) equals one process on the concatenated batch.

For losses built on batch statistics through `benchmarks.distributed.gather_cat`
(an NT-Xent over the gathered batch, a batch-mean KL), every rank's loss and the
DDP-averaged gradients must equal one process on the whole batch. SimCLR's own
criterion (lightly's NTXentLoss with gather_distributed=True) computes each rank's
share of the loss instead: the mean over ranks must equal the single-process loss.
One spawn runs every case (harness: tests/ddp_harness.py).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss

from benchmarks.distributed import gather_cat, gather_cat_nograd, rank, world_size

try:
    from tests import ddp_harness
except ImportError:  # pytest's rootdir-less import mode
    import ddp_harness


def ntxent_on_gathered(x_a, x_b, w, temperature):
    """NT-Xent over the global batch: every rank computes the same full-batch loss."""
    z_a, z_b = gather_cat(x_a @ w), gather_cat(x_b @ w)
    return NTXentLoss(temperature=temperature, gather_distributed=False)(z_a, z_b)


def batch_mean_kl(x, w):
    """KL(mean prediction over the global batch || uniform) minus the mean per-sample entropy."""
    probs = F.softmax(x @ w, dim=1)
    everyone = gather_cat(probs)
    mean = everyone.mean(dim=0)
    kl_to_uniform = (mean * (mean * mean.numel()).log()).sum()
    entropy = -(everyone * everyone.clamp_min(1e-12).log()).sum(dim=1).mean()
    return kl_to_uniform - entropy


def lightly_ntxent_distributed(x_a, x_b, w, temperature):
    """SimCLR's criterion as trained: negatives gathered inside lightly, loss over this rank's rows."""
    return NTXentLoss(temperature=temperature, gather_distributed=True)(x_a @ w, x_b @ w)


def _cases() -> dict:
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    n, d = 8, 5  # 4 samples per rank
    x_a, x_b = randn(n, d), randn(n, d)
    return {
        "ntxent_gathered": (functools.partial(ntxent_on_gathered, temperature=0.3), [x_a, x_b], [randn(d, 6)]),
        "batch_mean_kl": (batch_mean_kl, [x_a], [randn(d, 4)]),
        "lightly_ntxent": (functools.partial(lightly_ntxent_distributed, temperature=0.3), [x_a, x_b],
                           [randn(d, 6)]),
    }


def _worker(rank_: int, world: int, cases: dict) -> dict:
    result = ddp_harness.ddp_cases_worker(rank_, world, cases)
    local_indices = torch.arange(3) + 10 * rank_
    result["indices"] = gather_cat_nograd(local_indices)
    result["who"] = (rank(), world_size())
    return result


@pytest.fixture(scope="module")
def distributed():
    cases = _cases()
    return cases, ddp_harness.run_distributed(_worker, world_size=2, args=(cases,))


def test_gather_cat_is_identity_without_ddp():
    x = torch.randn(3, 2)
    assert gather_cat(x) is x and gather_cat_nograd(x) is x and (rank(), world_size()) == (0, 1)


@pytest.mark.slow  # spawns two processes that import torch
@pytest.mark.parametrize("name", ["ntxent_gathered", "batch_mean_kl"])
def test_gathered_batch_losses_match_one_process(distributed, name):
    cases, results = distributed
    loss_fn, inputs, params = cases[name]
    single = ddp_harness.single_process_loss_and_grads(loss_fn, inputs, params)
    ddp_harness.assert_matches_single_process([r[name] for r in results], single, atol=1e-10, rtol=1e-10)


@pytest.mark.slow
def test_simclr_criterion_matches_one_process_after_ddp_averaging(distributed):
    cases, results = distributed
    loss_fn, inputs, params = cases["lightly_ntxent"]
    single = ddp_harness.single_process_loss_and_grads(loss_fn, inputs, params)
    per_rank = [r["lightly_ntxent"] for r in results]
    assert not torch.allclose(per_rank[0]["loss"], per_rank[1]["loss"])  # each rank holds its share ...
    mean_loss = torch.stack([r["loss"] for r in per_rank]).mean()
    torch.testing.assert_close(mean_loss, single["loss"], atol=1e-10, rtol=1e-10)  # ... averaging to the whole
    for r in per_rank:
        for got, want in zip(r["param_grads"], single["param_grads"]):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
        for got, want in zip(r["input_grads"], single["input_grads"]):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.slow
def test_gather_cat_nograd_concatenates_in_rank_order(distributed):
    _, results = distributed
    expected = torch.tensor([0, 1, 2, 10, 11, 12])
    for r, result in enumerate(results):
        assert torch.equal(result["indices"], expected)
        assert result["who"] == (r, 2)
