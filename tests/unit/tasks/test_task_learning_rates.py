"""Each task's default learning rate and layer decay: a fresh segmentation encoder learns at the head's rate
in every block, a pretrained one keeps the decay; `visionfm finetune` uses the task's values unless told."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.unit.tasks.helpers import random_label_manifest, tiny_encoder
from visionfm_core.cli import build_app
from visionfm_core.tasks.adapters import ClassificationTask, SegmentationTask
from visionfm_core.tasks.persistence import load_task_model
from visionfm_core.tasks.trainer import FineTuneConfig, FineTuner, parameter_groups

TINY = ["--arch", "nano", "--image-size", "32", "--device", "cpu", "--threads", "1", "--batch-size", "4",
        "--epochs", "1", "--min-steps", "1", "--modality", "oct"]


@pytest.fixture(autouse=True)
def private_site_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISIONFM_STATE_DIR", str(tmp_path / "state"))


def _encoder_scales(task: SegmentationTask, pretrained: bool) -> list[float]:
    config = FineTuneConfig(lr=task.default_lr, layer_decay=task.default_layer_decay(pretrained))
    model = FineTuner(task, config).build_model(tiny_encoder())
    head = {id(p) for p in model.head.parameters()}
    return [group["lr_scale"] for group in parameter_groups(model, config)
            if not any(id(p) in head for p in group["params"])]


def test_a_fresh_segmentation_encoder_learns_at_the_heads_rate_everywhere() -> None:
    task = SegmentationTask(2)
    assert task.default_lr > ClassificationTask(2).default_lr
    fresh = _encoder_scales(task, pretrained=False)
    assert fresh and all(scale == 1.0 for scale in fresh)
    # A pretrained encoder keeps the decay: its patch embedding learns slowest.
    pretrained = _encoder_scales(task, pretrained=True)
    assert min(pretrained) < 0.5 and max(pretrained) <= 1.0
    assert ClassificationTask(2).default_layer_decay(pretrained=False) == 0.65




def _saved_config(manifest: Path, out: Path, *extra: str) -> dict[str, float]:
    result = CliRunner().invoke(build_app(), ["finetune", str(manifest), "--out", str(out), *TINY, *extra],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == str(out)
    config: dict[str, float] = load_task_model(out).metadata["finetune"]
    return config


def test_finetune_takes_the_tasks_rates_unless_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ClassificationTask, "default_lr", 3e-4)
    monkeypatch.setattr(ClassificationTask, "default_layer_decay", lambda self, pretrained: 0.9 if pretrained else 0.8)
    manifest = random_label_manifest(tmp_path, 12)
    config = _saved_config(manifest, tmp_path / "a.safetensors")
    assert (config["lr"], config["layer_decay"]) == (3e-4, 0.8)  # from scratch: no --encoder
    config = _saved_config(manifest, tmp_path / "b.safetensors", "--lr", "5e-3", "--layer-decay", "0.5")
    assert (config["lr"], config["layer_decay"]) == (5e-3, 0.5)
    # The task may tie its rate to the batch (segmentation does): the CLI asks at the batch it trains with.
    monkeypatch.setattr(ClassificationTask, "default_lr_for", lambda self, batch_size: 1e-4 * batch_size)
    assert _saved_config(manifest, tmp_path / "c.safetensors")["lr"] == pytest.approx(4e-4)  # --batch-size 4


def test_finetune_averages_the_weights_as_the_task_says_unless_told(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert SegmentationTask(2).default_ema_decay > 0 and ClassificationTask(2).default_ema_decay == 0
    monkeypatch.setattr(ClassificationTask, "default_ema_decay", 0.9)
    manifest = random_label_manifest(tmp_path, 12)
    assert _saved_config(manifest, tmp_path / "a.safetensors")["ema_decay"] == 0.9
    assert _saved_config(manifest, tmp_path / "b.safetensors", "--ema-decay", "0")["ema_decay"] == 0.0


def test_finetune_validates_as_often_as_the_task_says_unless_told(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Segmentation validates whole photographs, so it validates half as often as the other tasks.
    assert SegmentationTask.default_max_validations == 6 and ClassificationTask.default_max_validations == 12
    monkeypatch.setattr(ClassificationTask, "default_max_validations", 3)
    manifest = random_label_manifest(tmp_path, 12)
    assert _saved_config(manifest, tmp_path / "a.safetensors")["max_validations"] == 3
    assert _saved_config(manifest, tmp_path / "b.safetensors", "--max-validations", "2")["max_validations"] == 2
