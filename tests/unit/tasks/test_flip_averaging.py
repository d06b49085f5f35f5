"""Test-time mirror averaging of tiled dense prediction: exact mirror equivariance, used by a saved
model's evaluate/predict when its preprocessing asks, and the threshold chosen on the same scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tests.synthetic_fundus import synthetic_fundus
from tests.unit.tasks.helpers import tiny_encoder
from visionfm_core.data.items import ImageItem
from visionfm_core.models.encoders import EncoderSpec
from visionfm_core.models.heads import TaskModel
from visionfm_core.tasks import pipeline
from visionfm_core.tasks.adapters import SegmentationTask
from visionfm_core.tasks.data import Preprocess
from visionfm_core.tasks.persistence import load_task_model, save_task_model
from visionfm_core.tasks.samples import TaskSample
from visionfm_core.tasks.tiles import flip_averaged
from visionfm_core.tasks.trainer import FineTuneConfig, FineTuner

TILES = {"tiles": True, "fov_crop": True, "crops_per_image": 2, "overlap": 0.5}


def _model() -> TaskModel:
    torch.manual_seed(0)
    task = SegmentationTask(2, features=4)
    return TaskModel(tiny_encoder(32), task.build_head(32, 2, 16, "full")).eval()


def test_flip_averaged_scores_mirror_with_the_input() -> None:
    model = _model()
    tiles = torch.randn(2, 3, 32, 32)
    averaged = flip_averaged(model)
    with torch.no_grad():
        plain = model(tiles)
        base = averaged(tiles)
        # The model alone is not mirror-equivariant (so the check below is not vacuous) ...
        assert (model(tiles.flip(-1)).flip(-1) - plain).abs().max() > 1e-3
        # ... the average over the four mirror images is, exactly, for both axes.
        for dims in ((-1,), (-2,), (-2, -1)):
            torch.testing.assert_close(averaged(tiles.flip(dims)).flip(dims), base, atol=1e-5, rtol=1e-5)
        manual = sum(model(tiles.flip(d)).flip(d) if d else model(tiles) for d in ((), (-1,), (-2,), (-2, -1))) / 4
        torch.testing.assert_close(base, manual, atol=1e-6, rtol=1e-6)


def test_flip_averaging_leaves_a_mirror_symmetric_model_unchanged() -> None:
    pixelwise = nn.Conv2d(3, 2, 1)
    tiles = torch.randn(3, 3, 16, 20)
    with torch.no_grad():
        torch.testing.assert_close(flip_averaged(pixelwise)(tiles), pixelwise(tiles), atol=1e-6, rtol=1e-6)


@pytest.fixture
def photographs(tmp_path: Path) -> list[TaskSample]:
    samples = []
    for number, size in enumerate([(60, 80), (72, 64), (50, 90), (64, 64)]):
        image, vessels = synthetic_fundus(size, number)
        Image.fromarray(image).save(tmp_path / f"eye{number}.png")
        Image.fromarray((vessels * 255).astype(np.uint8)).save(tmp_path / f"eye{number}_mask.png")
        image_path, mask_path = tmp_path / f"eye{number}.png", tmp_path / f"eye{number}_mask.png"
        samples.append(TaskSample(ImageItem(str(image_path)), mask=str(mask_path)))
    return samples


def _meta() -> dict[str, object]:
    return {"timm_name": "vit_tiny_patch16_224", "timm_kwargs": EncoderSpec("nano", 32, 16).timm_kwargs()}


def test_a_saved_model_predicts_with_the_flips_its_preprocessing_names(
    photographs: list[TaskSample], tmp_path: Path
) -> None:
    task = SegmentationTask(2, features=4, threshold=0.5)
    model = _model()
    tuner = FineTuner(task, FineTuneConfig(batch_size=4, mixed_precision=False))
    outcomes = {}
    for flips in (False, True):
        preprocess = Preprocess(image_size=32, test_flips=flips, **TILES)
        path = save_task_model(tmp_path / f"seg{flips}.safetensors", model, task, preprocess, _meta())
        loaded = load_task_model(path)
        assert loaded.preprocess.test_flips is flips
        metrics = pipeline.evaluate(loaded, photographs, "cpu", batch_size=4)
        expected = tuner.evaluate(model, tuner.loader(photographs, preprocess, train=False), flips=flips)
        assert metrics["dice"] == expected["dice"]
        assert metrics["best_threshold"] == expected["best_threshold"]
        predicted = pipeline.predict(loaded, [s.item for s in photographs], "cpu", batch_size=4)
        unlabelled = tuner.loader(photographs, preprocess, train=False, with_targets=False)
        direct = tuner.predict(model, unlabelled, flips=flips)
        for mine, theirs in zip(predicted, direct, strict=True):
            np.testing.assert_array_equal(mine["mask"], theirs["mask"])
        outcomes[flips] = np.concatenate([p["mask"].ravel() for p in predicted])
    assert (outcomes[True] != outcomes[False]).any()  # averaging changed some decisions


def test_fit_chooses_the_threshold_on_flip_averaged_validation(photographs: list[TaskSample]) -> None:
    task = SegmentationTask(2, features=4)
    config = FineTuneConfig(epochs=1, min_steps=3, batch_size=2, mixed_precision=False, lr=3e-3)
    preprocess = Preprocess(image_size=32, test_flips=True, **TILES)
    tuner = FineTuner(task, config)
    result = tuner.fit(tiny_encoder(32), photographs[:3], photographs[3:], preprocess)
    val_loader = tuner.loader(photographs[3:], preprocess, train=False)
    averaged = tuner.evaluate(result.model, val_loader, flips=True)
    assert task.threshold == averaged["best_threshold"] == result.best_validation["best_threshold"]
    assert result.best_validation["dice_at_best_threshold"] == averaged["dice_at_best_threshold"]


def test_old_preprocessing_without_the_field_predicts_without_flips() -> None:
    raw = Preprocess(image_size=32).to_dict()
    raw.pop("test_flips")
    assert Preprocess.from_dict(raw).test_flips is False
    assert SegmentationTask(2).preprocess_defaults()["test_flips"] is True
