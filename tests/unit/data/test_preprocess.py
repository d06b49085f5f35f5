"""Fundus FOV crop against HRF's expert field-of-view masks; OCT normalisation; aspect-keeping resize."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import simulations
from visionfm_core.data.preprocess import (
    crop_fundus_fov,
    fundus_fov_box,
    fundus_fov_mask,
    normalise_oct_bscan,
    pad_to_square,
    resize_keep_aspect,
)
from visionfm_core.data.readers import read_image
from visionfm_core.errors import ConfigError

DATA = Path(simulations.__file__).parent / "data"


@pytest.mark.parametrize("name", ["01_h", "04_g", "08_dr", "12_h", "14_g"])
def test_fov_matches_the_expert_mask(name: str) -> None:
    image = read_image(DATA / "hrf" / "images" / f"{name}.jpg")
    with Image.open(DATA / "hrf" / "mask" / f"{name}_mask.png") as mask_file:
        expert = np.asarray(mask_file.convert("L")) > 127
    rows, cols = np.flatnonzero(expert.any(axis=1)), np.flatnonzero(expert.any(axis=0))
    top, bottom, left, right = fundus_fov_box(image)
    assert abs(top - rows[0]) <= 3 and abs(bottom - rows[-1] - 1) <= 3
    assert abs(left - cols[0]) <= 3 and abs(right - cols[-1] - 1) <= 3
    assert (fundus_fov_mask(image) == expert).mean() > 0.99


def test_crop_removes_black_borders_and_centres_the_disc_square() -> None:
    image = read_image(DATA / "idrid_seg" / "images" / "IDRiD_01.jpg")
    top, bottom, left, right = fundus_fov_box(image)
    assert left > 30 and right < image.shape[1] - 30  # IDRiD has wide black side borders
    assert image[:, :30].max(axis=2).mean() < 10  # the original's edge is border
    plain = crop_fundus_fov(image, square=False)
    assert plain.shape == (bottom - top, right - left, 3)
    edge_mask = fundus_fov_mask(plain)
    assert edge_mask[:, 0].any() and edge_mask[:, -1].any()  # the crop's edges touch the FOV
    cropped = crop_fundus_fov(image)
    side = max(bottom - top, right - left)
    assert cropped.shape == (side, side, 3)
    offset = (side - plain.shape[0]) // 2  # wider than tall: padded with black above and below
    assert (
        np.array_equal(cropped[offset : offset + plain.shape[0]], plain)
        and cropped[:offset].max(initial=0) == 0
    )


def test_crop_without_border_keeps_the_image() -> None:
    image = np.full((20, 30, 3), 120, dtype=np.uint8)
    assert fundus_fov_box(image) == (0, 20, 0, 30)
    assert crop_fundus_fov(image, square=False).shape == image.shape


def test_blank_outside_sets_corners_to_black() -> None:
    image = read_image(DATA / "hrf" / "images" / "02_h.jpg")[::4, ::4]
    blanked = crop_fundus_fov(image, blank_outside=True, square=False)
    assert blanked[0, 0].max() == 0 and blanked[blanked.shape[0] // 2, blanked.shape[1] // 2].max() > 0


def test_oct_normalisation_undoes_gain_and_offset() -> None:
    scan = read_image(next((DATA / "oct2017_val" / "val" / "DME").glob("*.jpeg")))
    dim = (scan.astype(np.float32) * 0.4 + 30).astype(np.uint8)  # another device's gain and offset
    a, b = normalise_oct_bscan(scan), normalise_oct_bscan(dim)
    assert np.abs(a.astype(int) - b).mean() < 2.5
    grey = a[:, :, 0]
    assert np.percentile(grey, 1) <= 1 and np.percentile(grey, 99.5) >= 250
    assert np.array_equal(a[:, :, 0], a[:, :, 2])
    flat = np.full((8, 8, 3), 77, dtype=np.uint8)
    assert np.array_equal(normalise_oct_bscan(flat), flat)
    with pytest.raises(ConfigError):
        normalise_oct_bscan(scan, 50, 10)


def test_resize_keeps_the_aspect_ratio() -> None:
    image = read_image(DATA / "hrf" / "images" / "03_h.jpg")  # 1752 x 1168 (3:2)
    plain = resize_keep_aspect(image, 96, pad=False)
    assert plain.shape == (64, 96, 3)
    padded = resize_keep_aspect(image, 96)
    assert padded.shape == (96, 96, 3)
    assert padded[:16].max() == 0 and padded[-16:].max() == 0 and np.array_equal(padded[16:80], plain)
    small = resize_keep_aspect(np.full((10, 5, 3), 200, dtype=np.uint8), 40, pad=False)
    assert small.shape == (40, 20, 3) and small.min() == 200


def test_pad_to_square_and_input_checks() -> None:
    assert pad_to_square(np.ones((3, 7, 3), dtype=np.uint8)).shape == (7, 7, 3)
    with pytest.raises(ConfigError, match="image"):
        fundus_fov_mask(np.zeros((5, 5), dtype=np.uint8))
    with pytest.raises(ConfigError, match="size"):
        resize_keep_aspect(np.zeros((5, 5, 3), dtype=np.uint8), 0)
