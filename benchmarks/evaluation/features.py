"""Feature extraction: one clean (un-augmented) pass of a frozen backbone over a split."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from benchmarks.data import ImageDataset


@torch.no_grad()
def extract(model_fn: Callable[[torch.Tensor], torch.Tensor | list[torch.Tensor]], dataset: ImageDataset,
            preprocess: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str = "cpu",
            batch_size: int = 512, desc: str | None = None) -> torch.Tensor | list[torch.Tensor]:
    """Run `model_fn(preprocess(uint8 batch))` over `dataset` in order; outputs concatenated on CPU.

    `model_fn` may return one tensor or a list of tensors (e.g. per-stage features).
    """
    outputs: list = []
    n = len(dataset)
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc=desc, disable=desc is None, leave=False):
        idx = torch.arange(start, min(start + batch_size, n))
        images = dataset.get_batch(idx).to(device, non_blocking=True)
        out = model_fn(preprocess(images))
        outputs.append([o.float().cpu() for o in out] if isinstance(out, (list, tuple)) else out.float().cpu())
    if not outputs:
        raise ValueError(f"{dataset.name}/{dataset.split}: no images to extract features from")
    if isinstance(outputs[0], list):
        return [torch.cat(parts) for parts in zip(*outputs)]
    return torch.cat(outputs)


def backbone_features(backbone: nn.Module, dataset: ImageDataset, preprocess, device="cpu", batch_size=512,
                      desc=None) -> torch.Tensor:
    was_training = backbone.training
    backbone.eval()
    try:
        return extract(backbone, dataset, preprocess, device, batch_size, desc)
    finally:
        backbone.train(was_training)
