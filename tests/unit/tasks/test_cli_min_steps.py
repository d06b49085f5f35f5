"""`visionfm finetune` takes its floor of optimiser steps from the task unless --min-steps is given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.unit.tasks.helpers import random_label_manifest
from visionfm_core.cli import build_app
from visionfm_core.tasks.adapters import ClassificationTask, SegmentationTask

TINY = ["--arch", "nano", "--image-size", "32", "--device", "cpu", "--threads", "1", "--batch-size", "4",
        "--epochs", "1", "--modality", "oct"]


@pytest.fixture(autouse=True)
def private_site_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISIONFM_STATE_DIR", str(tmp_path / "state"))




def _steps(manifest: Path, out: Path, *extra: str) -> int:
    args = ["finetune", str(manifest), "--out", str(out), *TINY, *extra]
    result = CliRunner().invoke(build_app(), args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return int(json.loads(result.stdout)["steps"])


def test_the_task_default_sets_the_floor_and_the_option_overrides_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tiled segmentation learns from a few crops a step: it gets a higher floor than the other tasks.
    assert SegmentationTask.default_min_steps > ClassificationTask.default_min_steps
    monkeypatch.setattr(ClassificationTask, "default_min_steps", 9)
    manifest = random_label_manifest(tmp_path, 20)
    # 16 training scans at a batch of 4: 4 steps an epoch.
    assert _steps(manifest, tmp_path / "a.safetensors") == 12  # 3 epochs reach the task's 9
    assert _steps(manifest, tmp_path / "b.safetensors", "--min-steps", "2") == 4  # 1 epoch
