"""Dense prediction on whole photographs: blended sliding windows, the field of view, source-resolution
scoring, the segmentation threshold chosen on validation, and the fast field-of-view finder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tests.synthetic_fundus import synthetic_fundus
from tests.unit.tasks.helpers import DATA, tiny_encoder
from visionfm_core.data.items import ImageItem
from visionfm_core.data.preprocess import fast_fundus_fov, fundus_fov_mask
from visionfm_core.data.readers import read_image
from visionfm_core.models.heads import LightUNETRHead, TaskModel
from visionfm_core.tasks import pipeline
from visionfm_core.tasks.adapters import SegmentationTask
from visionfm_core.tasks.data import Preprocess
from visionfm_core.tasks.persistence import load_task_model, save_task_model
from visionfm_core.tasks.samples import TaskSample
from visionfm_core.tasks.tiles import sliding_window, tile_starts
from visionfm_core.tasks.trainer import FineTuneConfig, FineTuner

TILES = {"tiles": True, "fov_crop": True, "crops_per_image": 2, "overlap": 0.5}


def test_tiles_cover_the_image_with_the_last_flush() -> None:
    assert tile_starts(100, 32, 16) == [0, 16, 32, 48, 64, 68]
    assert tile_starts(20, 32, 16) == [0]


def test_sliding_window_equals_whole_image_where_tiles_agree() -> None:
    # A per-pixel model gives every tile the same answer for a pixel: blending must reproduce it.
    torch.manual_seed(0)
    pixelwise = nn.Conv2d(3, 2, 1)
    image = torch.randn(3, 70, 95)
    with torch.no_grad():
        whole = pixelwise(image[None])[0]
        tiled = sliding_window(pixelwise, image, tile=32, overlap=0.5, batch_size=3)
    assert tiled.shape == whole.shape
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)


def test_sliding_window_on_one_tile_is_the_model_itself() -> None:
    torch.manual_seed(0)
    model = TaskModel(tiny_encoder(32), LightUNETRHead(32, 2, 2, features=4)).eval()
    image = torch.randn(3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            sliding_window(model, image, tile=32, overlap=0.5), model(image[None])[0], atol=1e-5, rtol=1e-5
        )


def _fundus(path: Path, size: tuple[int, int], seed: int) -> tuple[str, str]:
    """A synthetic photograph: a bright disc (the field of view) on black, with dark 'vessel' lines."""
    image, vessels = synthetic_fundus(size, seed)
    Image.fromarray(image).save(path.with_suffix(".png"))
    Image.fromarray((vessels * 255).astype(np.uint8)).save(path.with_name(path.stem + "_mask.png"))
    return str(path.with_suffix(".png")), str(path.with_name(path.stem + "_mask.png"))


@pytest.fixture
def photographs(tmp_path: Path) -> list[TaskSample]:
    sizes = [(60, 80), (72, 64), (50, 90), (64, 64)]
    samples = []
    for number, size in enumerate(sizes):
        image, mask = _fundus(tmp_path / f"eye{number}", size, number)
        samples.append(TaskSample(ImageItem(image), mask=mask))
    return samples


def _tiled_model(task: SegmentationTask) -> TaskModel:
    torch.manual_seed(0)
    return TaskModel(tiny_encoder(32), task.build_head(32, 2, 16, "full"))


def test_outside_the_field_of_view_is_background(photographs: list[TaskSample]) -> None:
    task = SegmentationTask(2, features=4, decoder="light")
    model = _tiled_model(task)
    assert isinstance(model.head, LightUNETRHead)
    with torch.no_grad():  # a model that calls every pixel a vessel
        model.head.classifier.bias.copy_(torch.tensor([-20.0, 20.0]))
    tuner = FineTuner(task, FineTuneConfig(batch_size=4, mixed_precision=False))
    preprocess = Preprocess(image_size=32, **TILES)
    predictions = tuner.predict(model, tuner.loader(photographs, preprocess, train=False, with_targets=False))
    for prediction in predictions:
        image = read_image(photographs[prediction["index"]].source)
        fov = fast_fundus_fov(image)
        mask = prediction["mask"]
        assert mask.shape == image.shape[:2]  # the source's own pixels
        assert mask[~fov].max() == 0 and mask[fov].min() == 1


def test_evaluate_scores_at_the_source_resolution(photographs: list[TaskSample], tmp_path: Path) -> None:
    task = SegmentationTask(2, features=4, threshold=0.5)
    model = _tiled_model(task)
    preprocess = Preprocess(image_size=32, **TILES)
    path = save_task_model(
        tmp_path / "seg.safetensors",
        model,
        task,
        preprocess,
        {"timm_name": "vit_tiny_patch16_224", "timm_kwargs": tiny_encoder_kwargs()},
    )
    loaded = load_task_model(path)
    metrics = pipeline.evaluate(loaded, photographs, "cpu", batch_size=4)
    predictions = pipeline.predict(loaded, [s.item for s in photographs], "cpu", batch_size=4)
    true_pos = false_pos = false_neg = 0
    for sample, prediction in zip(photographs, predictions, strict=True):
        truth = np.asarray(Image.open(str(sample.mask))) > 0
        predicted = prediction["mask"] > 0
        assert predicted.shape == truth.shape
        true_pos += int((predicted & truth).sum())
        false_pos += int((predicted & ~truth).sum())
        false_neg += int((~predicted & truth).sum())
    expected = 2 * true_pos / (2 * true_pos + false_pos + false_neg)
    assert metrics["dice"] == pytest.approx(expected, abs=1e-9)
    assert metrics["count"] == len(photographs)


def tiny_encoder_kwargs() -> dict[str, object]:
    from visionfm_core.models.encoders import EncoderSpec

    return EncoderSpec(arch="nano", image_size=32, patch_size=16).timm_kwargs()


def test_tiled_fit_learns_threshold_and_keeps_it(photographs: list[TaskSample]) -> None:
    task = SegmentationTask(2, features=4)
    config = FineTuneConfig(epochs=1, min_steps=3, batch_size=2, mixed_precision=False, lr=3e-3)
    preprocess = Preprocess(image_size=32, rotate=15.0, gamma=0.2, colour=0.1, **TILES)
    result = FineTuner(task, config).fit(tiny_encoder(32), photographs[:3], photographs[3:], preprocess)
    assert result.steps >= 3
    assert "best_threshold" in result.best_validation
    assert task.threshold == result.best_validation["best_threshold"]
    assert 0 < task.threshold < 1


def test_fast_fov_matches_the_expert_mask_on_hrf() -> None:
    image = read_image(DATA / "hrf" / "images" / "04_g.jpg")
    with Image.open(DATA / "hrf" / "mask" / "04_g_mask.png") as mask_file:
        expert = np.asarray(mask_file.convert("L")) > 127
    assert (fast_fundus_fov(image) == expert).mean() > 0.99


@pytest.mark.parametrize("border", [14, 40])
def test_a_lifted_grey_border_stays_outside_the_field_of_view(border: int) -> None:
    """An export with raised blacks and less contrast (a grey surround, not black): the threshold
    starts from the border measured in the corners, so the frame does not all count as inside."""
    image = read_image(DATA / "hrf" / "images" / "04_g.jpg")
    with Image.open(DATA / "hrf" / "mask" / "04_g_mask.png") as mask_file:
        expert = np.asarray(mask_file.convert("L")) > 127
    lifted = np.where(expert[..., None], image.astype(np.float32) * 0.7 + border, border).clip(0, 255)
    lifted = lifted.astype(np.uint8)
    assert (fast_fundus_fov(lifted) == expert).mean() > 0.99
    assert (fundus_fov_mask(lifted) == expert).mean() > 0.98


def test_fast_fov_of_a_borderless_image_is_everything() -> None:
    assert fast_fundus_fov(np.full((40, 50, 3), 120, np.uint8)).all()


def test_the_same_decoder_serves_idrid_lesions_multi_class() -> None:
    from visionfm_core.tasks.public_sets import IDRID_COLOURS
    from visionfm_core.tasks.samples import MaskEncoding

    names = ("background", *IDRID_COLOURS)
    encoding = MaskEncoding("colour", (((0, 0, 0), 0), *((rgb, i + 1) for i, rgb in enumerate(IDRID_COLOURS.values()))))
    root = DATA / "idrid_seg"
    samples = [
        TaskSample(ImageItem(str(root / "images" / f"IDRiD_0{n}.jpg")), mask=str(root / "masks" / f"IDRiD_0{n}.png"))
        for n in (1, 2)
    ]
    task = SegmentationTask(len(names), names, encoding, features=4)
    preprocess = Preprocess(image_size=32, fov_diameter=96, **TILES)
    config = FineTuneConfig(epochs=1, min_steps=2, batch_size=2, mixed_precision=False)
    tuner = FineTuner(task, config)
    result = tuner.fit(tiny_encoder(32), samples[:1], samples[1:], preprocess)
    assert {f"dice_{name}" for name in names[1:]} <= set(result.best_validation)
    assert "best_threshold" not in result.best_validation  # argmax over classes, no binary cut
    prediction = tuner.predict(result.model, tuner.loader(samples[1:], preprocess, False, with_targets=False))[0]
    assert prediction["mask"].shape == (712, 1072) and int(prediction["mask"].max()) < len(names)
