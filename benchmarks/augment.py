"""Batched, on-device view generation for uint8 image batches.

Why hand-written: the views must be drawn per image (each image its own crop,
flip, jitter) for a whole batch at once on the training device, from an explicit
`torch.Generator`, so that a resumed run redraws exactly the same views (bitwise
resume on CPU). torchvision.transforms.v2 draws one set of parameters per call
(not per image) and kornia draws from the global RNG; neither gives both.

The operations follow the SimCLR / MoCo-v2 pipeline (random resized crop,
horizontal flip, colour jitter, grayscale, Gaussian blur, solarisation) with
torchvision's parameter conventions. Colour jitter is applied in the fixed order
brightness, contrast, saturation, hue (torchvision shuffles the order); hue is a
rotation of the chroma plane in YIQ space.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field, Strict, field_validator
from torch import nn

from ssl_common.typed import AtLeastOne, NonNegativeFloat, StrictModel, UnitInterval

Fraction = Annotated[float, Strict()]


class ViewSpec(StrictModel):
    """How to draw one kind of view (`count` views of it per image); a suite's `augment.views[i]`."""

    size: AtLeastOne
    count: AtLeastOne = 2
    scale: tuple[Fraction, Fraction] = Field((0.2, 1.0), strict=False)  # a YAML list is fine
    ratio: tuple[Fraction, Fraction] = Field((3 / 4, 4 / 3), strict=False)
    hflip_p: UnitInterval = 0.5
    jitter_p: UnitInterval = 0.8
    brightness: NonNegativeFloat = 0.4
    contrast: NonNegativeFloat = 0.4
    saturation: NonNegativeFloat = 0.4
    hue: NonNegativeFloat = 0.1
    grayscale_p: UnitInterval = 0.2
    blur_p: UnitInterval = 0.0
    blur_sigma: tuple[Fraction, Fraction] = Field((0.1, 2.0), strict=False)
    solarize_p: UnitInterval = 0.0

    @field_validator("scale")
    @classmethod
    def _scale(cls, value):
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError(f"needs 0 < low <= high <= 1, got {list(value)}")
        return value

    @field_validator("ratio", "blur_sigma")
    @classmethod
    def _range(cls, value):
        if not 0 < value[0] <= value[1]:
            raise ValueError(f"needs 0 < low <= high, got {list(value)}")
        return value

    @classmethod
    def from_dict(cls, values: dict) -> ViewSpec:
        return cls.model_validate(values)


@dataclass
class Normalization:
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _uniform(low: float, high: float, n: int, generator: torch.Generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def _bernoulli(p: float, n: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) < p


def _to_gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return 0.299 * r + 0.587 * g + 0.114 * b  # ITU-R 601-2 luma, as torchvision


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor.view(-1, 1, 1, 1) * x + (1 - factor.view(-1, 1, 1, 1)) * other).clamp(0, 1)


_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_FROM_YIQ = torch.linalg.inv(_TO_YIQ)


@functools.cache
def _yiq_matrices(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The YIQ matrices on `device`, made once: a host-to-GPU copy (and a GPU linalg.inv) in every
    call would synchronise the GPU with the host twice per view."""
    with torch.inference_mode(False):
        return _TO_YIQ.to(device, dtype), _FROM_YIQ.to(device, dtype)


def _rotate_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `shift` (fraction of a turn) per image, via the YIQ chroma plane."""
    to_yiq, from_yiq = _yiq_matrices(x.device, x.dtype)
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x)
    angle = shift * 2 * math.pi
    cos, sin = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], dim=1)
    return torch.einsum("ij,bjhw->bihw", from_yiq, yiq).clamp(0, 1)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur (kernel ~10% of the image side, odd) as one grouped conv."""
    b, c, h, w = x.shape
    radius = max(1, int(0.05 * min(h, w)))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [B, K]
    kernel = kernel.repeat_interleave(c, dim=0)  # one kernel per (image, channel)
    flat = x.reshape(1, b * c, h, w)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel.view(b * c, 1, 1, -1), groups=b * c)
    flat = F.conv2d(flat, kernel.view(b * c, 1, -1, 1), groups=b * c)
    return flat.view(b, c, h, w)


class BatchAugment(nn.Module):
    """Turns a uint8 [B, C, H, W] batch into a list of normalised float views."""

    def __init__(self, views: list[ViewSpec], normalization: Normalization):
        super().__init__()
        self.views = list(views)
        self.register_buffer("mean", torch.tensor(normalization.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(normalization.std).view(1, -1, 1, 1), persistent=False)

    @property
    def num_views(self) -> int:
        return sum(spec.count for spec in self.views)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def clean(self, images: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """The evaluation view: the whole image resized to `size` (default: the first view's size)."""
        x = images.float().div_(255.0)
        size = size or self.views[0].size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return self.normalize(x)

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        x = images.float().div_(255.0)
        out = []
        for spec in self.views:
            for _ in range(spec.count):
                out.append(self.normalize(self.draw_view(x, spec, generator)))
        return out

    def draw_view(self, x: torch.Tensor, spec: ViewSpec, generator: torch.Generator) -> torch.Tensor:
        n, device = x.shape[0], x.device
        x = self._resized_crop(x, spec, generator)
        if x.shape[1] == 3 or spec.brightness or spec.contrast:
            x = self._color_jitter(x, spec, generator)
        if x.shape[1] == 3 and spec.grayscale_p > 0:
            gray = _bernoulli(spec.grayscale_p, n, generator, device).view(-1, 1, 1, 1)
            x = torch.where(gray, _to_gray(x).expand_as(x), x)
        if spec.blur_p > 0:
            blur = _bernoulli(spec.blur_p, n, generator, device).view(-1, 1, 1, 1)
            sigma = _uniform(*spec.blur_sigma, n, generator, device)
            x = torch.where(blur, _gaussian_blur(x, sigma), x)
        if spec.solarize_p > 0:
            solarize = _bernoulli(spec.solarize_p, n, generator, device).view(-1, 1, 1, 1)
            x = torch.where(solarize & (x >= 0.5), 1.0 - x, x)
        return x

    @staticmethod
    def _resized_crop(x: torch.Tensor, spec: ViewSpec, generator: torch.Generator) -> torch.Tensor:
        """RandomResizedCrop + horizontal flip for every image at once (affine grid sampling)."""
        n, device = x.shape[0], x.device
        area = _uniform(*spec.scale, n, generator, device)
        log_ratio = _uniform(math.log(spec.ratio[0]), math.log(spec.ratio[1]), n, generator, device)
        ratio = torch.exp(log_ratio)
        # crop width/height as fractions of the image side (aspect taken relative to the image)
        width = torch.sqrt(area * ratio).clamp(max=1.0)
        height = torch.sqrt(area / ratio).clamp(max=1.0)
        # centre in normalised [-1, 1] coordinates, uniform over valid positions
        cx = (1 - width) * (2 * torch.rand(n, generator=generator, device=device) - 1)
        cy = (1 - height) * (2 * torch.rand(n, generator=generator, device=device) - 1)
        flip = torch.where(_bernoulli(spec.hflip_p, n, generator, device), -1.0, 1.0)
        theta = torch.zeros(n, 2, 3, device=device, dtype=x.dtype)
        theta[:, 0, 0] = width * flip
        theta[:, 0, 2] = cx
        theta[:, 1, 1] = height
        theta[:, 1, 2] = cy
        grid = F.affine_grid(theta, [n, x.shape[1], spec.size, spec.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    @staticmethod
    def _color_jitter(x: torch.Tensor, spec: ViewSpec, generator: torch.Generator) -> torch.Tensor:
        n, device = x.shape[0], x.device
        apply = _bernoulli(spec.jitter_p, n, generator, device)
        ones = torch.ones(n, device=device, dtype=x.dtype)
        factor = {}
        for name in ("brightness", "contrast", "saturation"):
            strength = getattr(spec, name)
            drawn = _uniform(max(0.0, 1 - strength), 1 + strength, n, generator, device)
            factor[name] = torch.where(apply, drawn, ones)
        hue = torch.where(apply, _uniform(-spec.hue, spec.hue, n, generator, device), torch.zeros_like(ones))
        y = (x * factor["brightness"].view(-1, 1, 1, 1)).clamp(0, 1)
        mean_gray = _to_gray(y).mean(dim=(1, 2, 3), keepdim=True)
        y = _blend(y, mean_gray, factor["contrast"])
        if y.shape[1] == 3:
            y = _blend(y, _to_gray(y), factor["saturation"])
            if spec.hue > 0:
                y = _rotate_hue(y, hue)
        return y


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator that depends only on (seed, step): views are reproducible across resumes."""
    generator = torch.Generator(device=device)
    generator.manual_seed((int(seed) * 1_000_003 + int(step) * 7919 + 12345) % (2**63 - 1))
    return generator
