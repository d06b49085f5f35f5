"""A fine-tuned task model saved to one file comes back identical, or fails naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.unit.tasks.helpers import tiny_encoder
from visionfm_core.errors import CheckpointError
from visionfm_core.models.checkpoint import encoder_metadata, save_encoder
from visionfm_core.models.encoders import EncoderSpec
from visionfm_core.tasks.adapters import ClassificationTask, SegmentationTask
from visionfm_core.tasks.data import Preprocess
from visionfm_core.tasks.persistence import load_task_model, save_task_model
from visionfm_core.tasks.trainer import FineTuneConfig, FineTuner


@pytest.mark.parametrize("regime", ["frozen", "full"])
def test_round_trip_gives_identical_outputs(tmp_path: Path, regime: str) -> None:
    task = ClassificationTask(3, "ordinal", ("a", "b", "c"), class_weighting="balanced", weights=[1.0, 0.5, 2.0])
    spec = EncoderSpec("nano", 32)
    model = FineTuner(task, FineTuneConfig(regime=regime)).build_model(tiny_encoder())  # type: ignore[arg-type]
    model.eval()
    preprocess = Preprocess.for_modality("oct", 32)
    path = save_task_model(
        tmp_path / "m.safetensors", model, task, preprocess, encoder_metadata(spec, "oct"), extra={"best_epoch": 3}
    )
    loaded = load_task_model(path)
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.model(images), model(images))
    assert loaded.task == task and loaded.preprocess == preprocess
    assert loaded.model.freeze_encoder == (regime == "frozen")
    assert loaded.metadata["best_epoch"] == 3 and loaded.encoder_metadata["modality"] == "oct"


def test_segmentation_model_round_trip(tmp_path: Path) -> None:
    task = SegmentationTask(3, features=4)
    model = FineTuner(task, FineTuneConfig()).build_model(tiny_encoder())
    model.eval()
    path = save_task_model(
        tmp_path / "s.safetensors", model, task, Preprocess(32), encoder_metadata(EncoderSpec("nano", 32), "fundus")
    )
    images = torch.randn(1, 3, 32, 32)
    assert torch.equal(load_task_model(path).model(images), model(images))


def test_an_encoder_checkpoint_is_not_a_task_model(tmp_path: Path) -> None:
    spec = EncoderSpec("nano", 32)
    path = save_encoder(tmp_path / "enc.safetensors", tiny_encoder().state_dict(), encoder_metadata(spec, "fundus"))
    with pytest.raises(CheckpointError, match=r"enc\.safetensors: no task metadata"):
        load_task_model(path)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match=r"junk\.safetensors"):
        load_task_model(tmp_path / "junk.safetensors")
