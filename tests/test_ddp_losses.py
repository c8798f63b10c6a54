"""Under DDP (2 gloo processes), the seed methods' losses equal one process on the whole batch.

Each loss sits behind a shared linear head (a parameter, like the network's last
layer) so both the input and the parameter gradients are compared. One spawn runs
every case.
"""

from __future__ import annotations

import functools

import pytest
import torch

try:
    from tests import ddp_harness
except ImportError:  # pytest's rootdir-less import mode
    import ddp_harness

from methods.carl import carl_loss
from methods.carp import carp_loss, random_partition
from methods.self_classifier import self_classifier_loss


def _self_classifier_two_heads(x_a, x_b, w_small, w_large):
    logits_a = [x_a @ w_small, x_a @ w_large]
    logits_b = [x_b @ w_small, x_b @ w_large]
    return self_classifier_loss(logits_a, logits_b, row_tau=0.5, col_tau=0.25, row_l1_norm=True)


def _self_classifier_no_l1(x_a, x_b, w):
    return self_classifier_loss(x_a @ w, x_b @ w, row_tau=0.3, col_tau=0.3, row_l1_norm=False)


def _carl(x_a, x_b, w, kl_weight):
    return carl_loss(x_a @ w, x_b @ w, kl_weight)


def _carp(x_a, x_b, w, partition, kl_weight):
    return carp_loss(x_a @ w, x_b @ w, partition, kl_weight)


def _cases() -> dict:
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    n, d = 8, 4  # 4 samples per rank
    x_a, x_b = randn(n, d), randn(n, d)
    partition = random_partition(6, 3, torch.Generator().manual_seed(1))
    return {
        "self_classifier_heads": (_self_classifier_two_heads, [x_a, x_b], [randn(d, 3), randn(d, 5)]),
        "self_classifier_no_l1": (_self_classifier_no_l1, [x_a, x_b], [randn(d, 5)]),
        "carl": (functools.partial(_carl, kl_weight=1.7), [x_a, x_b], [randn(d, 6)]),
        "carp": (functools.partial(_carp, partition=partition, kl_weight=0.9), [x_a, x_b], [randn(d, 6)]),
    }


@pytest.mark.slow  # spawns two processes that import torch (~10-15 s)
def test_losses_under_ddp_equal_single_process_on_the_concatenated_batch():
    cases = _cases()
    ddp = ddp_harness.run_distributed(ddp_harness.ddp_cases_worker, world_size=2, args=(cases,))
    for name, (fn, inputs, params) in cases.items():
        single = ddp_harness.single_process_loss_and_grads(fn, inputs, params)
        # a loss that used only the local half would differ: the check has power
        local_only = ddp_harness.single_process_loss_and_grads(fn, [x[:4] for x in inputs], params)
        assert not torch.allclose(local_only["loss"], single["loss"], atol=1e-4), name
        ddp_harness.assert_matches_single_process([r[name] for r in ddp], single, atol=1e-5, rtol=1e-5)
