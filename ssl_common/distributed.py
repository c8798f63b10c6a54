"""DDP helpers: global-batch statistics for losses.

`gather_cat(x)` concatenates x from every rank in rank order. Gradients flow back
through lightly's GatherLayer, so a loss computed on the gathered batch on every
rank, with DDP's gradient averaging, gives the same gradients as one process on
the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightly.utils.dist import gather


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def gather_cat(x: torch.Tensor) -> torch.Tensor:
    """x from every rank, concatenated along dim 0 (identity without DDP); differentiable."""
    if not is_distributed():
        return x
    return torch.cat(gather(x), dim=0)


def gather_cat_nograd(x: torch.Tensor) -> torch.Tensor:
    """Like gather_cat for tensors that need no gradient (indices, labels)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
