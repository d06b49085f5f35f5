"""Inputs keep their aspect ratio: OCT B-scans get a non-square input (patch grid H/p x W/p), fundus
stays square, and the geometry travels with the saved model."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.unit.tasks.helpers import tiny_encoder
from visionfm_core.data.items import ImageItem
from visionfm_core.models.checkpoint import encoder_metadata, save_encoder
from visionfm_core.models.encoders import EncoderSpec, create_encoder, encoder_state
from visionfm_core.models.heads import TaskModel
from visionfm_core.tasks import pipeline
from visionfm_core.tasks.adapters.classification import ClassificationTask
from visionfm_core.tasks.aspect import choose_aspect, input_shape, median_aspect, parse_aspect
from visionfm_core.tasks.data import Preprocess
from visionfm_core.tasks.geometry import Window, letterbox, logits_to_source, resample_image
from visionfm_core.tasks.persistence import load_task_model
from visionfm_core.tasks.samples import TaskSample
from visionfm_core.tasks.trainer import FineTuneConfig


def _wide_oct(count: int, height: int = 40, width: int = 100, seed: int = 0) -> list[TaskSample]:
    """Wide grey "B-scans": class 1 has a bright band in the lower half, class 0 in the upper half."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        label = i % 2
        image = rng.integers(0, 40, size=(height, width, 3), dtype=np.uint8)
        band = slice(height // 2 + 4, height - 4) if label else slice(4, height // 2 - 4)
        image[band] = 200
        samples.append(TaskSample(ImageItem(f"wide[{i}]", label=label, modality="oct", _array=image), label=label))
    return samples


def test_a_32x64_input_runs_through_encoder_and_both_classification_heads() -> None:
    encoder = tiny_encoder(32)
    images = torch.randn(2, 3, 32, 64)
    for regime in ("full", "frozen"):
        head = ClassificationTask(3).build_head(32, 2, 16, regime)
        model = TaskModel(encoder, head, freeze_encoder=regime == "frozen")
        assert model(images).shape == (2, 3)  # type: ignore[union-attr]


def test_input_shape_keeps_the_aspect_with_the_square_patch_budget() -> None:
    assert input_shape(512 / 496, 224, 16) == (224, 224)  # OCT2017's Spectralis scans: square
    height, width = input_shape(550 / 224, 224, 16)  # the wide B-scans
    assert (height % 16, width % 16) == (0, 0)
    assert width / height == pytest.approx(550 / 224, rel=0.1)
    assert (height // 16) * (width // 16) == pytest.approx(14 * 14, rel=0.1)
    assert height > 224 * 224 / 550  # the retina is taller than letterboxed into the square
    assert max(input_shape(20.0, 224, 16)) == 448  # the long side is capped
    with pytest.raises(Exception, match="multiple of patch size"):
        input_shape(2.0, 100, 16)


def test_aspect_setting_and_modality_decide() -> None:
    wide = [s.item for s in _wide_oct(5)]
    assert parse_aspect("square") == 1.0 and parse_aspect("16:9") == pytest.approx(16 / 9)
    assert parse_aspect("auto") is None
    with pytest.raises(Exception, match="input_aspect"):
        parse_aspect("wide")
    assert median_aspect(wide) == pytest.approx(2.5)
    assert choose_aspect("auto", "oct", wide) == pytest.approx(2.5)
    assert choose_aspect("auto", "fundus", wide) == 1.0  # a round field of view stays square
    assert choose_aspect("square", "oct", wide) == 1.0


def test_letterbox_into_a_wide_input_keeps_the_aspect_and_maps_back() -> None:
    image = np.zeros((50, 100, 3), dtype=np.uint8)
    image[:, :50] = 255  # left half white
    window = letterbox(50, 100, 64, rows=32)  # same aspect: fills the input, no padding
    assert window.scale == pytest.approx(0.64) and window.rows == 32
    resampled = resample_image(image, window)
    assert resampled.shape == (3, 32, 64)
    assert resampled[:, :, :30].min() > 0.99 and resampled[:, :, 34:].max() < 0.01
    points = np.array([[10.0, 20.0], [99.0, 49.0]])
    assert np.allclose(window.to_source(window.to_input(points)), points)
    assert Window.from_tensor(window.as_tensor()) == window
    # A squarer image in the wide input: full height, black bars left and right (not squashed).
    bars = letterbox(50, 50, 64, rows=32)
    assert bars.scale == pytest.approx(32 / 50) and bars.x0 == pytest.approx(-25.0)
    # Scores at the input map back to every source pixel.
    logits = torch.zeros(2, 32, 64)
    logits[1, :, 32:] = 1.0  # right half
    logits[0, 16:, :] = 1.0  # lower half
    source = logits_to_source(logits, window, 50, 100)
    assert source.shape == (2, 50, 100)
    assert float(source[1, :, :45].max()) == 0.0 and float(source[1, :, 55:].min()) == pytest.approx(1.0)
    assert float(source[0, :22].max()) == 0.0 and float(source[0, 28:].min()) == pytest.approx(1.0)


def test_a_square_encoder_used_on_a_wide_input_is_resampled_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = EncoderSpec(arch="nano", image_size=32, patch_size=16)
    state, meta = encoder_state(create_encoder(spec)), encoder_metadata(spec, "oct")
    path = save_encoder(tmp_path / "enc.safetensors", state, meta)
    with caplog.at_level(logging.WARNING):
        encoder, meta = pipeline.prepare_encoder(pipeline.EncoderSource(str(path)), "oct", 32, aspect=4.0)
    assert meta["input_shape"] == [16, 64] and meta["timm_kwargs"]["img_size"] == [16, 64]
    assert encoder.pos_embed.shape[1] == 1 + 1 * 4  # type: ignore[union-attr]
    assert "pretrained at 32 px and is used at 16x64 px" in caplog.text and "2x2 to 1x4 patches" in caplog.text
    assert encoder.forward_features(torch.randn(1, 3, 16, 64)).shape == (1, 5, 32)  # type: ignore[operator]


def test_oct_fine_tuning_takes_a_wide_input_and_the_model_keeps_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    train, val = _wide_oct(8), _wide_oct(4, seed=1)
    config = FineTuneConfig(epochs=1, batch_size=4, mixed_precision=False)
    out = tmp_path / "oct.safetensors"
    pipeline.finetune(ClassificationTask(2, mode="binary"), pipeline.EncoderSource(arch="nano"), "oct", train, val,
                      config, 32, "cpu", out)
    loaded = load_task_model(out)
    assert loaded.preprocess.input_shape == (16, 48)  # 100x40 is 2.5:1 -> 1x3 patches of 16 (the square has 2x2)
    assert loaded.model.encoder.pos_embed.shape[1] == 1 + 3  # type: ignore[union-attr]
    assert pipeline.evaluate(loaded, val, "cpu")["count"] == 4
    predictions = pipeline.predict(loaded, [s.item for s in val], "cpu")
    assert len(predictions) == 4 and all("error" not in p for p in predictions)
    # Fundus photographs stay square whatever the images' shape.
    pipeline.finetune(ClassificationTask(2, mode="binary"), pipeline.EncoderSource(arch="nano"), "fundus", train,
                      val, config, 32, "cpu", out)
    assert load_task_model(out).preprocess.input_shape == (32, 32)


def test_a_model_saved_before_the_input_height_existed_loads_square() -> None:
    old = Preprocess(image_size=32).to_dict()
    del old["image_height"]
    assert Preprocess.from_dict(old).input_shape == (32, 32)
