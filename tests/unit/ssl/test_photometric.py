"""Batched photometric augmentation: per-image draws, torchvision's maths, nothing changed that was not drawn."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from visionfm_core.data.photometric import Photometric

PLAIN = Photometric(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, jitter_prob=0.0, grayscale_prob=0.0,
                    blur_prob=0.0, blur_sigma=(0.5, 1.0), solarize_prob=0.0, mean=(0.5, 0.4, 0.3),
                    std=(0.2, 0.25, 0.3))


def _images(batch: int = 8, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def _unnormalise(stage: Photometric, out: torch.Tensor) -> torch.Tensor:
    return out * torch.tensor(stage.std).view(1, -1, 1, 1) + torch.tensor(stage.mean).view(1, -1, 1, 1)


def test_with_nothing_drawn_it_is_scaling_and_normalisation_only() -> None:
    images = _images()
    out = PLAIN(images)
    assert out.dtype == torch.float32
    assert torch.allclose(_unnormalise(PLAIN, out), images.float() / 255, atol=1e-6)


def test_every_image_draws_its_own_brightness() -> None:
    stage = dataclasses.replace(PLAIN, brightness=0.4, jitter_prob=1.0)
    images = torch.full((16, 3, 8, 8), 100, dtype=torch.uint8)
    levels = _unnormalise(stage, stage(images)).mean(dim=(1, 2, 3))
    assert len(torch.unique(levels.round(decimals=5))) == 16
    assert bool(((levels >= 0.6 * 100 / 255 - 1e-5) & (levels <= 1.4 * 100 / 255 + 1e-5)).all())


def test_blur_matches_torchvision_for_the_drawn_sigma_and_leaves_undrawn_images_alone() -> None:
    stage = dataclasses.replace(PLAIN, blur_prob=0.5, blur_sigma=(0.8, 0.8))
    images = _images(batch=32, size=20)
    torch.manual_seed(1)
    out = _unnormalise(stage, stage(images))
    source = images.float() / 255
    reference = TF.gaussian_blur(source, kernel_size=[7, 7], sigma=[0.8, 0.8])  # radius ceil(3 * 0.8) = 3
    blurred = [torch.allclose(out[i], reference[i], atol=1e-5) for i in range(32)]
    untouched = [torch.allclose(out[i], source[i], atol=1e-5) for i in range(32)]
    assert all(b != u for b, u in zip(blurred, untouched, strict=True))  # each image one or the other
    assert 4 <= sum(blurred) <= 28


def test_solarisation_inverts_only_bright_values_of_drawn_images() -> None:
    stage = dataclasses.replace(PLAIN, solarize_prob=1.0)
    images = torch.tensor([[[[0, 127, 128, 255]]] * 3], dtype=torch.uint8)
    out = _unnormalise(stage, stage(images))[0, 0, 0]
    assert torch.allclose(out, torch.tensor([0.0, 127 / 255, 1 - 128 / 255, 0.0]), atol=1e-6)


def test_grey_images_stay_grey_through_jitter_blur_and_grayscale() -> None:
    stage = dataclasses.replace(PLAIN, brightness=0.3, contrast=0.3, jitter_prob=1.0, grayscale_prob=0.5,
                                blur_prob=1.0, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    grey = _images()[:, :1].expand(-1, 3, -1, -1).contiguous()
    out = stage(grey)
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-5) and torch.allclose(out[:, 1], out[:, 2], atol=1e-5)


@pytest.mark.parametrize("field", ["saturation", "contrast"])
def test_saturation_and_contrast_blend_like_torchvision(field: str) -> None:
    stage = dataclasses.replace(PLAIN, jitter_prob=1.0, **{field: 0.5})
    images = _images(batch=1)
    torch.manual_seed(5)
    out = _unnormalise(stage, stage(images))[0]
    torch.manual_seed(5)
    torch.rand(1), torch.randperm(1)  # the draws before the factor: which images, then the order
    factor = float(torch.empty(1).uniform_(0.5, 1.5))
    adjust = TF.adjust_saturation if field == "saturation" else TF.adjust_contrast
    assert torch.allclose(out, adjust(images.float()[0] / 255, factor), atol=1e-4)  # luma 0.299 vs 0.2989
