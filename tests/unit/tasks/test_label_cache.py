"""Decoded segmentation masks are kept for the crops of later epochs, within a byte budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionfm_core.data.items import ImageItem
from visionfm_core.errors import DataError
from visionfm_core.tasks.adapters import SegmentationTask
from visionfm_core.tasks.adapters.segmentation import DecodedLabels
from visionfm_core.tasks.geometry import Window
from visionfm_core.tasks.samples import MaskEncoding, TaskSample


def _sample(tmp_path: Path, with_fov: bool) -> TaskSample:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "eye.png")
    Image.fromarray(((rng.random((30, 40)) < 0.2) * 255).astype(np.uint8)).save(tmp_path / "eye_mask.png")
    fov = np.zeros((30, 40), np.uint8)
    fov[5:25, 5:35] = 255
    Image.fromarray(fov).save(tmp_path / "eye_fov.png")
    return TaskSample(
        ImageItem(str(tmp_path / "eye.png")),
        mask=str(tmp_path / "eye_mask.png"),
        fov=str(tmp_path / "eye_fov.png") if with_fov else None,
    )


def test_a_decoded_mask_is_reused_and_cannot_be_changed(tmp_path: Path) -> None:
    sample = _sample(tmp_path, with_fov=True)
    cache = DecodedLabels()
    first = cache.get(sample, MaskEncoding("binary"), 2, (30, 40))
    assert first[0, 0] == 255 and set(np.unique(first[5:25, 5:35])) <= {0, 1}  # ignored outside the FOV
    Path(str(sample.mask)).unlink()  # a second read of the file would now fail
    again = cache.get(sample, MaskEncoding("binary"), 2, (30, 40))
    assert again is first and cache.used == first.nbytes
    with pytest.raises(ValueError):
        again[0, 0] = 1


def test_over_budget_masks_are_decoded_every_time(tmp_path: Path) -> None:
    sample = _sample(tmp_path, with_fov=False)
    cache = DecodedLabels(budget=100)  # smaller than one 30x40 map
    cache.get(sample, MaskEncoding("binary"), 2, (30, 40))
    assert cache.used == 0
    Path(str(sample.mask)).unlink()
    with pytest.raises(DataError):
        cache.get(sample, MaskEncoding("binary"), 2, (30, 40))


def test_the_task_crops_from_the_kept_mask_like_from_the_file(tmp_path: Path) -> None:
    sample = _sample(tmp_path, with_fov=True)
    window = Window(x0=4.0, y0=2.0, side=24.0, size=16)
    fresh = SegmentationTask(2).prepare(sample, window, (30, 40))["mask"]
    task = SegmentationTask(2)
    task.prepare(sample, window, (30, 40))
    assert task.labels.used > 0
    assert (task.prepare(sample, window, (30, 40))["mask"] == fresh).all()
    assert "labels" not in task.to_config()
