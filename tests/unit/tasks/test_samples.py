"""Mask decoding on the bundled real masks and on edge cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.unit.tasks.helpers import DATA
from visionfm_core.data.items import ImageItem
from visionfm_core.errors import ConfigError, DataError
from visionfm_core.evaluation.task_metrics import IGNORE_INDEX
from visionfm_core.tasks.public_sets import idrid_disc_encoding
from visionfm_core.tasks.samples import MaskEncoding, TaskSample, decode_mask, load_target_mask


def test_binary_mask_accepts_0_255_and_0_1() -> None:
    assert decode_mask(np.array([[0, 255], [128, 10]], dtype=np.uint8), MaskEncoding(), 2).tolist() == [
        [0, 1],
        [1, 0],
    ]
    assert decode_mask(np.array([[0, 1]], dtype=np.uint8), MaskEncoding(), 2).tolist() == [[0, 1]]


def test_binary_mask_counts_any_bright_channel(tmp_path: Path) -> None:
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)  # pure red would be dark as luminance
    Image.fromarray(rgb).save(tmp_path / "m.png")
    assert decode_mask(str(tmp_path / "m.png"), MaskEncoding(), 2).tolist() == [[1, 0], [0, 0]]


def test_real_idrid_colour_mask_gives_disc_and_ignores_overlaps() -> None:
    labels = decode_mask(str(DATA / "idrid_seg/masks/IDRiD_01.png"), idrid_disc_encoding(), 2)
    rgb = np.asarray(Image.open(DATA / "idrid_seg/masks/IDRiD_01.png").convert("RGB"))
    yellow = (rgb == (255, 255, 0)).all(-1)
    assert (labels[yellow] == 1).all() and yellow.sum() > 1000
    assert (labels[(rgb == 0).all(-1)] == 0).all()


def test_index_masks_and_out_of_range_ids(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 1], [2, 9]], dtype=np.uint8)).save(tmp_path / "m.png")
    assert decode_mask(str(tmp_path / "m.png"), MaskEncoding("index"), 3).tolist() == [[0, 1], [2, IGNORE_INDEX]]


def test_field_of_view_marks_outside_pixels_ignored() -> None:
    sample = TaskSample(
        ImageItem(str(DATA / "hrf/images/01_h.jpg")),
        mask=str(DATA / "hrf/manual1/01_h.png"),
        fov=str(DATA / "hrf/mask/01_h_mask.png"),
    )
    labels = load_target_mask(sample, MaskEncoding(), 2, (1168, 1752))
    fov = np.asarray(Image.open(DATA / "hrf/mask/01_h_mask.png")) > 127
    assert (labels[~fov] == IGNORE_INDEX).all() and (labels[fov] != IGNORE_INDEX).all()
    assert 0.05 < (labels[fov] == 1).mean() < 0.2  # HRF vessels cover about a tenth of the field of view


def test_mask_errors_name_the_file(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "small.png")
    sample = TaskSample(ImageItem("img.png"), mask=str(tmp_path / "small.png"))
    with pytest.raises(DataError, match=r"small\.png"):
        load_target_mask(sample, MaskEncoding(), 2, (8, 8))
    with pytest.raises(DataError, match=r"missing\.png: mask file not found"):
        decode_mask(str(tmp_path / "missing.png"), MaskEncoding(), 2)
    with pytest.raises(DataError, match=r"img\.png"):
        load_target_mask(TaskSample(ImageItem("img.png")), MaskEncoding(), 2, (8, 8))


def test_colour_table_parsing() -> None:
    encoding = MaskEncoding.parse_colours("0,0,0=0; 255,255,0=1")
    assert encoding.colours == (((0, 0, 0), 0), ((255, 255, 0), 1))
    assert MaskEncoding.from_dict(encoding.to_dict()) == encoding
    with pytest.raises(ConfigError, match="mask_colours"):
        MaskEncoding.parse_colours("red=1")


def test_gif_palette_and_tiff_masks(tmp_path: Path) -> None:
    truth = np.zeros((6, 5), dtype=np.uint8)
    truth[1:4, 2:4] = 1
    Image.fromarray(truth * 255).convert("P").save(tmp_path / "drive_style.gif")  # DRIVE ships GIF masks
    Image.fromarray(truth * 255).save(tmp_path / "mask.tif")
    for name in ("drive_style.gif", "mask.tif"):
        assert (decode_mask(str(tmp_path / name), MaskEncoding(), 2) == truth).all()
