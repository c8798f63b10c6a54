"""A reusable 2-process DDP harness (gloo, CPU) for checking global-batch losses.

A loss that computes batch statistics (a softmax over the batch, a batch mean) must
give, under DDP, the same value and gradients as one process on the concatenated
batch. The recipe, used for every such loss in the suite:

    cases = {"name": (loss_fn, [full_input, ...], [param, ...]), ...}
    ddp = run_distributed(ddp_cases_worker, args=(cases,))      # spawns the processes once
    single = single_process_loss_and_grads(loss_fn, inputs, params)

`loss_fn(*local_inputs, *params)` must be picklable (a module-level function or a
functools.partial of one). Each rank gets its contiguous slice of every input (as a
leaf tensor requiring grad), runs the loss and backward, then its parameter
gradients are averaged over ranks as DDP does, and its input gradients are divided
by the world size (the same factor DDP applies: with lightly's GatherLayer every rank
back-propagates the full-batch loss, so each slice receives world_size times its
single-process gradient). Use float64 inputs to compare at a tight tolerance.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, init_file: str, out_dir: str, worker, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        result = worker(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_distributed(worker, world_size: int = 2, args: tuple = ()) -> list:
    """Run `worker(rank, world_size, *args)` in `world_size` gloo processes; returns each rank's result."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_entry, args=(world_size, init_file, tmp, worker, args), nprocs=world_size, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def local_slice(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous part of a full batch (rank order = gather order)."""
    return x.chunk(world_size, dim=0)[rank]


def ddp_loss_and_grads(loss_fn, inputs: list[torch.Tensor], params: list[torch.Tensor], rank: int,
                       world_size: int) -> dict:
    """Inside a rank: loss on the local slices, backward, gradients as DDP leaves them.

    Returns {"loss", "input_grads" (full batch, this rank's slices gathered in rank
    order), "param_grads" (averaged over ranks)}.
    """
    local = [local_slice(x, rank, world_size).clone().requires_grad_(True) for x in inputs]
    shared = [p.clone().requires_grad_(True) for p in params]
    loss = loss_fn(*local, *shared)
    loss.backward()
    param_grads = []
    for p in shared:
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grad)
        param_grads.append(grad / world_size)
    input_grads = []
    for x in local:
        grad = (x.grad if x.grad is not None else torch.zeros_like(x)) / world_size
        parts = [torch.empty_like(grad) for _ in range(world_size)]
        dist.all_gather(parts, grad.contiguous())
        input_grads.append(torch.cat(parts))
    return {"loss": loss.detach(), "input_grads": input_grads, "param_grads": param_grads}


def ddp_cases_worker(rank: int, world_size: int, cases: dict) -> dict:
    """Worker for run_distributed: every case {name: (loss_fn, inputs, params)} in one spawn."""
    return {name: ddp_loss_and_grads(fn, inputs, params, rank, world_size) for name, (fn, inputs, params) in cases.items()}


def single_process_loss_and_grads(loss_fn, inputs: list[torch.Tensor], params: list[torch.Tensor]) -> dict:
    """The reference: the same loss on the whole batch in one process."""
    full = [x.clone().requires_grad_(True) for x in inputs]
    shared = [p.clone().requires_grad_(True) for p in params]
    loss = loss_fn(*full, *shared)
    loss.backward()
    zeros = torch.zeros_like
    return {"loss": loss.detach(),
            "input_grads": [x.grad if x.grad is not None else zeros(x) for x in full],
            "param_grads": [p.grad if p.grad is not None else zeros(p) for p in shared]}


def assert_matches_single_process(ddp_results: list[dict], single: dict, atol: float = 1e-5,
                                  rtol: float = 1e-5) -> None:
    """Every rank's loss, input and parameter gradients equal the single-process ones."""
    for rank, result in enumerate(ddp_results):
        torch.testing.assert_close(result["loss"], single["loss"], atol=atol, rtol=rtol,
                                   msg=lambda m, r=rank: f"rank {r} loss: {m}")
        for i, (got, want) in enumerate(zip(result["input_grads"], single["input_grads"])):
            torch.testing.assert_close(got, want, atol=atol, rtol=rtol,
                                       msg=lambda m, r=rank, i=i: f"rank {r} input {i} grad: {m}")
        for i, (got, want) in enumerate(zip(result["param_grads"], single["param_grads"])):
            torch.testing.assert_close(got, want, atol=atol, rtol=rtol,
                                       msg=lambda m, r=rank, i=i: f"rank {r} param {i} grad: {m}")
