"""Multi-scale test-time prediction of tiled dense models: a saved model's scores are the mean of its
scores at each scale of the working resolution; validation during training stays at one scale."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.synthetic_fundus import synthetic_fundus
from tests.unit.tasks.helpers import single_torch_thread, tiny_encoder  # noqa: F401  (autouse fixture)
from visionfm_core.data.items import ImageItem
from visionfm_core.errors import ConfigError
from visionfm_core.models.heads import TaskModel
from visionfm_core.tasks.adapters import SegmentationTask
from visionfm_core.tasks.data import Preprocess, TaskDataset
from visionfm_core.tasks.samples import TaskSample
from visionfm_core.tasks.trainer import FineTuneConfig, FineTuner

BASE = Preprocess(image_size=32, tiles=True, fov_crop=True, overlap=0.5, fov_diameter=48)


@pytest.fixture
def photograph(tmp_path: Path) -> list[TaskSample]:
    image, vessels = synthetic_fundus((70, 90), 3)
    Image.fromarray(image).save(tmp_path / "eye.png")
    Image.fromarray((vessels * 255).astype(np.uint8)).save(tmp_path / "eye_mask.png")
    return [TaskSample(ImageItem(str(tmp_path / "eye.png")), mask=str(tmp_path / "eye_mask.png"))]


def scores(preprocess: Preprocess, samples: list[TaskSample], flips: bool) -> torch.Tensor:
    torch.manual_seed(0)
    task = SegmentationTask(2, features=4)
    model = TaskModel(tiny_encoder(32), task.build_head(32, 2, 16, "full")).eval()
    tuner = FineTuner(task, FineTuneConfig(batch_size=4, mixed_precision=False))
    with torch.no_grad():
        return tuner.source_probabilities(model, TaskDataset(samples, preprocess, task.prepare, train=False), 0, flips)


def test_scores_are_the_mean_over_the_test_scales(photograph: list[TaskSample]) -> None:
    single = scores(BASE, photograph, flips=True)
    larger = scores(dataclasses.replace(BASE, fov_diameter=72), photograph, flips=True)
    both = scores(dataclasses.replace(BASE, test_scales=(1.0, 1.5)), photograph, flips=True)
    assert (larger - single).abs().max() > 1e-3  # the scale changes the scores (the check is not vacuous)
    torch.testing.assert_close(both, (single + larger) / 2, atol=1e-5, rtol=1e-5)
    assert both.shape == single.shape == (2, 70, 90)  # every source pixel, at each scale
    torch.testing.assert_close(both.sum(0), torch.ones(70, 90), atol=1e-5, rtol=1e-5)


def test_validation_during_training_uses_one_scale(photograph: list[TaskSample]) -> None:
    """Without flips (the per-epoch validation) the scales are not used: validation stays cheap."""
    plain = scores(BASE, photograph, flips=False)
    multi = scores(dataclasses.replace(BASE, test_scales=(1.0, 1.5)), photograph, flips=False)
    torch.testing.assert_close(plain, multi)


def test_scales_round_trip_and_old_preprocessing_loads() -> None:
    raw = json.loads(json.dumps(dataclasses.replace(BASE, test_scales=(1.0, 1.25)).to_dict()))
    assert Preprocess.from_dict(raw).test_scales == (1.0, 1.25)
    raw.pop("test_scales")
    assert Preprocess.from_dict(raw).test_scales == (1.0,)
    for bad in ((), (0.0,), (1.0, 10.0)):
        with pytest.raises(ConfigError, match="test_scales"):
            Preprocess(test_scales=bad)
