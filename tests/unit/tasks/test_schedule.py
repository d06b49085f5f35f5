"""Defaults that learn on a small set: steps not epochs, a batch that fits the set, the warning when
the first epoch is the best, and the position embedding resampled (and said) at another resolution."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tests.unit.tasks.helpers import retinamnist, tiny_encoder
from visionfm_core.models.checkpoint import encoder_metadata, save_encoder
from visionfm_core.models.encoders import EncoderSpec, create_encoder, encoder_state
from visionfm_core.tasks import pipeline
from visionfm_core.tasks.adapters import ClassificationTask
from visionfm_core.tasks.data import Preprocess
from visionfm_core.tasks.trainer import FineTuneConfig, FineTuner, Schedule

PLAIN = Preprocess(image_size=32, max_zoom=1.0, flip=False, jitter=0.0)


def test_small_set_gets_a_fitting_batch_and_the_minimum_steps() -> None:
    schedule = Schedule.plan(FineTuneConfig(epochs=2, batch_size=16, min_steps=30), examples=10)
    assert schedule.batch_size == 2  # 10 images at batch 16 would be one step an epoch
    assert schedule.steps_per_epoch == 5
    assert schedule.total_steps >= 30 and schedule.epochs == 6
    large = Schedule.plan(FineTuneConfig(epochs=3, batch_size=16, min_steps=30), examples=1000)
    assert (large.batch_size, large.epochs) == (16, 3)  # a large set keeps what was asked
    assert Schedule.plan(FineTuneConfig(batch_size=16), examples=100, max_batch=8).batch_size == 8


def test_fit_takes_the_minimum_number_of_optimiser_steps() -> None:
    task = ClassificationTask(5, mode="multiclass")
    config = FineTuneConfig(epochs=1, batch_size=16, min_steps=12, mixed_precision=False)
    result = FineTuner(task, config).fit(tiny_encoder(32), retinamnist("train", 8), retinamnist("val", 4), PLAIN)
    assert result.batch_size == 2
    assert result.steps == 12
    assert len(result.history) >= 2  # validated more than once, so the best epoch is a real choice


def test_warns_when_the_first_epoch_is_the_best(caplog: pytest.LogCaptureFixture) -> None:
    # A learning rate too small to change anything: later epochs can only tie, never beat, the first.
    task = ClassificationTask(5, mode="multiclass")
    config = FineTuneConfig(epochs=3, batch_size=4, lr=1e-12, min_lr=1e-13, mixed_precision=False)
    with caplog.at_level(logging.WARNING):
        result = FineTuner(task, config).fit(
            tiny_encoder(32), retinamnist("train", 8), retinamnist("val", 4), PLAIN
        )
    assert result.best_epoch == 0
    assert result.warnings and "first validated epoch" in result.warnings[0]
    assert "learnt nothing" in caplog.text


def test_no_warning_when_a_later_epoch_is_best() -> None:
    task = ClassificationTask(5, mode="multiclass", label_smoothing=0.0)
    config = FineTuneConfig(epochs=4, batch_size=4, lr=3e-3, mixed_precision=False, select_metric="loss")
    result = FineTuner(task, config).fit(tiny_encoder(32), retinamnist("train", 8), retinamnist("train", 8), PLAIN)
    assert result.best_epoch > 0  # validating on the training images: the loss keeps falling
    assert not any("first validated epoch" in w for w in result.warnings)


def test_encoder_at_another_resolution_is_resampled_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = EncoderSpec(arch="nano", image_size=32, patch_size=16)
    torch.manual_seed(0)
    encoder = create_encoder(spec)
    path = save_encoder(tmp_path / "enc.safetensors", encoder_state(encoder), encoder_metadata(spec, "fundus"))
    with caplog.at_level(logging.WARNING):
        resized, meta = pipeline.prepare_encoder(pipeline.EncoderSource(str(path)), "fundus", 64)
    assert resized.pos_embed.shape[1] == 1 + 4 * 4  # type: ignore[union-attr]
    assert meta["timm_kwargs"]["img_size"] == 64
    assert "pretrained at 32 px and is used at 64 px" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pipeline.prepare_encoder(pipeline.EncoderSource(str(path)), "fundus", 32)
    assert "resampled" not in caplog.text
