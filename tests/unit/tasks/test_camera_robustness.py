"""Segmentation defaults that carry to other cameras: local contrast standardisation inside the field
of view cancels colour gain, offset and (nearly) gamma; the working scale follows the field-of-view
diameter, so a photograph and its 2x downscale show vessels at the same width in working pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from visionfm_core.data.items import ImageItem
from visionfm_core.data.preprocess_contrast import Z_SCALE, local_contrast
from visionfm_core.errors import ConfigError
from visionfm_core.tasks.adapters import SegmentationTask
from visionfm_core.tasks.data import Preprocess, TaskDataset
from visionfm_core.tasks.samples import TaskSample
from visionfm_core.tasks.tiles import FieldOfView, to_working, working_scale


def synthetic_fundus(side: int, vessel_width: int, noise: float = 0.03) -> tuple[np.ndarray, np.ndarray]:
    """An orange disc (diameter 0.9 * side) lit unevenly, with a dark vertical vessel through the
    middle and speckle; returns the image and its field-of-view mask."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    radius = 0.45 * side
    inside = np.hypot(yy - side / 2, xx - side / 2) < radius
    light = 0.55 + 0.35 * (xx / side)  # illumination falling off to the left
    base = np.stack([0.9 * light, 0.45 * light, 0.2 * light], axis=-1)
    vessel = np.abs(xx - side / 2 + 0.5) < vessel_width / 2
    base[vessel] *= 0.6
    base += rng.normal(0, noise, base.shape).astype(np.float32)
    image = (np.clip(base, 0, 1) * 255 * inside[..., None]).round().astype(np.uint8)
    return image, inside


def inside_values(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return image[mask].astype(np.float64)


def test_local_contrast_cancels_a_colour_gain_and_offset_inside_the_fov() -> None:
    image, fov = synthetic_fundus(160, 6)
    shifted = np.clip(image.astype(np.float32) * np.array([0.7, 1.3, 0.9]) + 12, 0, 255).round().astype(np.uint8)
    shifted[~fov] = 0
    a = local_contrast(image, fov, 144)
    b = local_contrast(shifted, fov, 144)
    # Exact up to the 8-bit rounding of the shifted photograph (a tenth of a standard deviation).
    assert np.abs(inside_values(a, fov) - inside_values(b, fov)).mean() < 0.1 * Z_SCALE
    # Without the standardisation the two differ by tens of grey levels.
    assert np.abs(inside_values(image, fov) - inside_values(shifted, fov)).mean() > 10.0


def test_local_contrast_nearly_cancels_gamma_and_is_black_outside_the_fov() -> None:
    image, fov = synthetic_fundus(320, 3)  # a vessel narrower than the neighbourhood (sigma 4.8 px)
    gamma = (255 * (image / 255.0) ** 1.6).round().astype(np.uint8)
    a, b = local_contrast(image, fov, 288), local_contrast(gamma, fov, 288)
    for channel in range(3):
        correlation = np.corrcoef(a[..., channel][fov], b[..., channel][fov])[0, 1]
        assert correlation > 0.95
    assert not a[~fov].any()
    # The vessel stands out against its neighbourhood in every channel (darker than the local mean).
    vessel = a[120:200, 159:161].reshape(-1, 3).astype(float).mean(axis=0)
    assert (vessel < 128 - Z_SCALE).all()


def test_local_contrast_takes_statistics_from_the_fov_only() -> None:
    # The black border must not drag the rim's local mean down (which would make the rim glow).
    image, fov = synthetic_fundus(160, 6)
    out = local_contrast(image, fov, 144)
    shrunk = Image.fromarray(fov.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(9))
    rim = fov & ~np.asarray(shrunk).astype(bool)
    assert abs(inside_values(out, rim).mean() - 128) < 20


def vessel_width_in_working_pixels(image: np.ndarray, fov_diameter: int) -> int:
    fov = FieldOfView.of(image, detect=True)
    working, mask = to_working(image, fov, working_scale(fov, fov_diameter))
    middle = working.shape[1] // 2
    profile = working[0, middle - 5 : middle + 5].mean(dim=0)[mask[middle]]
    return int((profile < 0.8 * profile.median()).sum())


def test_a_photograph_and_its_2x_downscale_show_vessels_equally_wide_at_the_working_scale() -> None:
    full, _ = synthetic_fundus(400, 8, noise=0.0)
    half = np.asarray(Image.fromarray(full).resize((200, 200), Image.Resampling.BOX))
    width_full = vessel_width_in_working_pixels(full, 256)
    width_half = vessel_width_in_working_pixels(half, 256)
    assert width_full >= 4  # 8 px at 360 px FOV diameter -> about 5.7 px at 256
    assert abs(width_full - width_half) <= 1
    # At each image's own resolution (fov_diameter 0) the widths differ twofold.
    assert vessel_width_in_working_pixels(full, 0) >= 2 * vessel_width_in_working_pixels(half, 0) - 1


def write_png(path: Path, image: np.ndarray) -> TaskSample:
    Image.fromarray(image).save(path)
    return TaskSample(ImageItem(str(path)))


def test_segmentation_defaults_feed_the_network_the_same_image_for_two_cameras(tmp_path: Path) -> None:
    defaults = SegmentationTask().preprocess_defaults()
    assert defaults["contrast"] == "local" and defaults["blur"] > 0 and defaults["fov_diameter"] > 0
    image, fov = synthetic_fundus(200, 6)
    other = np.clip((image / 255.0) ** 1.3 * np.array([1.1, 0.8, 0.6]) * 255, 0, 255).astype(np.uint8)
    samples = [write_png(tmp_path / "a.png", image), write_png(tmp_path / "b.png", other)]
    preprocess = Preprocess(image_size=64, fov_crop=True, **defaults)
    dataset = TaskDataset(samples, preprocess, lambda *_: {}, train=False)
    (a, fov_a), (b, _) = dataset.load(0), dataset.load(1)
    assert fov_a is not None
    for channel in range(3):
        assert np.corrcoef(a[..., channel][fov], b[..., channel][fov])[0, 1] > 0.95
    # The raw photographs are far apart in colour.
    assert np.abs(image[fov].astype(int) - other[fov].astype(int)).mean() > 20


def test_preprocess_checks_contrast_and_blur_and_old_metadata_loads() -> None:
    with pytest.raises(ConfigError, match="contrast"):
        Preprocess(contrast="clahe")
    with pytest.raises(ConfigError, match="blur"):
        Preprocess(blur=-1.0)
    old = Preprocess().to_dict()
    del old["contrast"], old["blur"]
    assert Preprocess.from_dict(old).contrast == "none"


def test_blur_augmentation_keeps_shape_and_range_and_softens_edges() -> None:
    torch.manual_seed(0)
    image = torch.zeros(3, 32, 32)
    image[:, :, 16:] = 1.0
    preprocess = Preprocess(jitter=0.0, blur=2.0)
    outputs = [preprocess.photometric(image.clone()) for _ in range(16)]
    assert all(out.shape == image.shape and float(out.min()) >= 0 and float(out.max()) <= 1 for out in outputs)
    softened = [out for out in outputs if 0.05 < float(out[0, 16, 15]) < 0.95]
    assert 0 < len(softened) < 16  # about half the crops are blurred
