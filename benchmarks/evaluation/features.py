"""Feature extraction: one clean (un-augmented) pass of a frozen backbone over a split, and the
check that the features are finite before any protocol scores them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from benchmarks.data import ImageDataset
from benchmarks.errors import BenchmarkError

try:  # one class, wherever it lives: benchmarks.errors may define it later
    from benchmarks.errors import NonFiniteFeaturesError
except ImportError:
    class NonFiniteFeaturesError(BenchmarkError, FloatingPointError):
        """A backbone's features hold NaN or inf (e.g. a diverged run): no metric can be computed."""


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """`module` in eval mode (BN running statistics, no dropout) inside the block, its own mode restored after
    (a model that was training goes on training)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def _nonfinite_rows(x) -> torch.Tensor:
    x = torch.as_tensor(x).detach()
    if not x.is_floating_point():  # integer arrays cannot hold NaN
        return torch.zeros(len(x), dtype=torch.bool)
    return (~torch.isfinite(x.reshape(len(x), -1))).any(dim=1).cpu()


def count_nonfinite_rows(features) -> int:
    """Rows (images) with at least one NaN or inf entry; for a list of per-stage features, the
    images that are bad in any stage."""
    if isinstance(features, (list, tuple)):
        masks = [_nonfinite_rows(f) for f in features]
        return int(torch.stack(masks).any(dim=0).sum()) if masks else 0
    return int(_nonfinite_rows(features).sum())


def check_finite(features: torch.Tensor | Sequence[torch.Tensor], *, method: str, protocol: str,
                 split: str) -> torch.Tensor | Sequence[torch.Tensor]:
    """Raise NonFiniteFeaturesError if any feature row is NaN/inf; else return `features` unchanged.

    Called on every split's features before a protocol uses them: NaN features would otherwise
    give a silent, meaningless number (a NaN query matches no neighbour and votes for class 0).
    A list (per-stage features, one row per image in each) counts an image bad if any stage is.
    """
    bad = count_nonfinite_rows(features)
    if bad:
        total = len(features[0]) if isinstance(features, (list, tuple)) else len(features)
        raise NonFiniteFeaturesError(
            f"evaluation: method '{method}', protocol {protocol}: {bad} of {total} {split} feature rows are not "
            "finite (NaN or inf); the backbone's features are broken (a diverged run?), so no metric is computed")
    return features


def is_streamed(dataset) -> bool:
    """A dataset read from disk batch by batch (benchmarks.streaming.EncodedImageFolder)."""
    return not dataset.in_memory and hasattr(dataset, "decode")


def batches_of(dataset, batch_size: int, device) -> Iterator[torch.Tensor]:
    """uint8 batches of `dataset` in index order on `device` (streamed data: read by DataLoader workers)."""
    if is_streamed(dataset):
        from benchmarks.streaming import decoded_batches

        for images, _, _ in decoded_batches(dataset, batch_size, device):
            yield images
        return
    for start in range(0, len(dataset), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(dataset)))
        yield dataset.get_batch(idx).to(device, non_blocking=True)


@torch.no_grad()
def extract(model_fn: Callable[[torch.Tensor], torch.Tensor | list[torch.Tensor]], dataset: ImageDataset,
            preprocess: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str = "cpu",
            batch_size: int = 512, desc: str | None = None) -> torch.Tensor | list[torch.Tensor]:
    """Run `model_fn(preprocess(uint8 batch))` over `dataset` in order; outputs concatenated on CPU.

    `model_fn` may return one tensor or a list of tensors (e.g. per-stage features).
    """
    outputs: list = []
    n = len(dataset)
    total = -(-n // batch_size)
    for images in tqdm(batches_of(dataset, batch_size, device), total=total, desc=desc, disable=desc is None, leave=False):
        out = model_fn(preprocess(images))
        outputs.append([o.float().cpu() for o in out] if isinstance(out, (list, tuple)) else out.float().cpu())
    if not outputs:
        raise ValueError(f"{dataset.name}/{dataset.split}: no images to extract features from")
    if isinstance(outputs[0], list):
        return [torch.cat(parts) for parts in zip(*outputs)]
    return torch.cat(outputs)


def backbone_features(backbone: nn.Module, dataset: ImageDataset, preprocess, device="cpu", batch_size=512,
                      desc=None) -> torch.Tensor:
    """`extract` with the backbone in eval mode (BN running statistics), its mode restored after."""
    with eval_mode(backbone):
        return extract(backbone, dataset, preprocess, device, batch_size, desc)
