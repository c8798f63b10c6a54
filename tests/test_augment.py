"""Batched views: shapes, reproducibility from the generator, per-image randomness, and each operation
checked against torchvision's functional transforms or a hand-computed value."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from benchmarks.augment import BatchAugment, Normalization, ViewSpec, step_generator

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
PLAIN = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0.0, jitter_p=0.0, grayscale_p=0.0)  # identity view


def images(n=4, c=3, size=32, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def normalized(x: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    return TF.normalize(x.float() / 255.0, list(mean), list(std))


def augment(*views: ViewSpec, mean=MEAN, std=STD) -> BatchAugment:
    return BatchAugment(list(views), Normalization(mean, std))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_views_have_the_requested_count_size_and_dtype():
    aug = augment(ViewSpec(size=16, count=2), ViewSpec(size=8, count=3))
    views = aug(images(5), gen(0))
    assert aug.num_views == 5 and len(views) == 5
    assert [tuple(v.shape) for v in views] == [(5, 3, 16, 16)] * 2 + [(5, 3, 8, 8)] * 3
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)


def test_same_generator_seed_same_views_other_seed_other_views():
    aug = augment(ViewSpec(size=24, count=2, blur_p=0.5, solarize_p=0.2))
    x = images()
    first, again, other = aug(x, gen(7)), aug(x, gen(7)), aug(x, gen(8))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))
    assert not torch.equal(first[0], first[1])  # the two views of one call differ too


def test_step_generator_depends_only_on_seed_and_step():
    def draw(seed, step):
        return torch.rand(4, generator=step_generator(seed, step))

    assert torch.equal(draw(0, 5), draw(0, 5))
    assert not torch.equal(draw(0, 5), draw(0, 6)) and not torch.equal(draw(0, 5), draw(1, 5))


def test_each_image_of_a_batch_gets_its_own_crop():
    one = images(1, size=32)
    batch = one.expand(6, -1, -1, -1).contiguous()  # six copies of one image
    (view,) = augment(ViewSpec(size=16, count=1, scale=(0.2, 0.6), hflip_p=0.0, jitter_p=0.0, grayscale_p=0.0))(
        batch, gen(0))
    for i in range(6):
        for j in range(i + 1, 6):
            assert not torch.allclose(view[i], view[j]), (i, j)


def test_full_crop_is_the_image_and_a_forced_flip_mirrors_it():
    x = images()
    (same,) = augment(ViewSpec(size=32, count=1, **PLAIN))(x, gen(0))
    torch.testing.assert_close(same, normalized(x), atol=1e-5, rtol=0)
    (mirrored,) = augment(ViewSpec(size=32, count=1, **{**PLAIN, "hflip_p": 1.0}))(x, gen(0))
    torch.testing.assert_close(mirrored, normalized(TF.horizontal_flip(x)), atol=1e-5, rtol=0)


def _ramp_spans(scale, n=32, seed=3):
    """Horizontal value span of views of a linear ramp image (value = 8 * column), relative to the image's."""
    x = (torch.arange(32) * 8).to(torch.uint8).expand(n, 1, 32, 32).contiguous()
    spec = ViewSpec(size=32, count=1, scale=scale, ratio=(1.0, 1.0), hflip_p=0.0, jitter_p=0.0, grayscale_p=0.0)
    (view,) = augment(spec, mean=(0.0,), std=(1.0,))(x, gen(seed))
    rows = view[:, 0, 0, :] * 255.0
    full = 31 * 8  # the span over the 32 pixel centres of the whole image
    return (rows[:, -1] - rows[:, 0]) / full, rows


def test_crop_side_follows_the_scale_and_its_position_varies():
    # area 1/4 with aspect 1: the crop is half the image wide, so a ramp's span halves, wherever it sits
    spans, rows = _ramp_spans((0.25, 0.25))
    # (the crop box spans whole pixels, so at an image border the outermost samples lie a quarter pixel past the
    # last pixel centre and reflect back: up to 0.25 * 8 / 248 less span)
    torch.testing.assert_close(spans, torch.full_like(spans, 0.5), atol=0.0085, rtol=0)
    assert (spans - 0.5).abs().median() < 1e-4
    assert rows[:, 0].std() > 5  # different images, different positions
    assert rows.min() >= 0 and rows.max() <= 248 + 1e-3  # inside the image
    spans, _ = _ramp_spans((0.25, 1.0))
    assert (spans >= 0.5 - 1e-4).all() and (spans <= 1.0 + 1e-4).all() and spans.std() > 0.05


def test_brightness_jitter_scales_each_image_by_one_factor_in_range():
    x = torch.randint(20, 120, (8, 3, 16, 16), generator=gen(1), dtype=torch.uint8)  # no clamping at 1.5x
    spec = ViewSpec(size=16, count=1, **{**PLAIN, "jitter_p": 1.0}, brightness=0.5, contrast=0.0, saturation=0.0,
                    hue=0.0)
    (view,) = augment(spec, mean=(0.0,) * 3, std=(1.0,) * 3)(x, gen(2))
    ratio = view / (x.float() / 255.0)
    per_image = ratio.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image), atol=1e-4)
    factors = per_image[:, 0]
    assert ((factors >= 0.5) & (factors <= 1.5)).all() and factors.std() > 0.05


def test_grayscale_is_the_itu_r_601_2_luma_in_every_channel():
    x = images(4, size=16)
    spec = ViewSpec(size=16, count=1, **{**PLAIN, "grayscale_p": 1.0})
    (view,) = augment(spec, mean=(0.0,) * 3, std=(1.0,) * 3)(x, gen(0))
    r, g, b = (x.float() / 255.0).unbind(dim=1)
    luma = 0.299 * r + 0.587 * g + 0.114 * b  # PIL's convert("L") weights (torchvision: 0.2989)
    torch.testing.assert_close(view, luma.unsqueeze(1).expand(-1, 3, -1, -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(view, TF.rgb_to_grayscale(x.float() / 255.0, num_output_channels=3), atol=2e-4,
                               rtol=0)


def test_solarize_inverts_bright_pixels_only():
    x = images(4, size=16)
    spec = ViewSpec(size=16, count=1, **PLAIN, solarize_p=1.0)
    (view,) = augment(spec, mean=(0.0,) * 3, std=(1.0,) * 3)(x, gen(0))
    expected = TF.solarize(x.float() / 255.0, threshold=0.5)
    torch.testing.assert_close(view, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [32, 20, 8])
def test_clean_view_is_resize_then_normalize(size):
    x = images(3, size=32)
    aug = augment(ViewSpec(size=size, count=2))
    expected = TF.normalize(TF.resize(x.float() / 255.0, [size, size], antialias=True), list(MEAN), list(STD))
    torch.testing.assert_close(aug.clean(x), expected, atol=1e-5, rtol=0)
    if size == 32:  # no resize: exactly (x / 255 - mean) / std
        torch.testing.assert_close(aug.clean(x), normalized(x), atol=0, rtol=0)


def test_clean_view_is_deterministic_and_uses_an_explicit_size():
    x = images(2, size=32)
    aug = augment(ViewSpec(size=16, count=2))
    assert torch.equal(aug.clean(x), aug.clean(x))
    assert aug.clean(x, size=8).shape == (2, 3, 8, 8)
