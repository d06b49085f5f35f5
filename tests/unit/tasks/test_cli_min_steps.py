"""`visionfm finetune` takes its floor of optimiser steps from the task unless --min-steps is given."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from visionfm_core.cli import build_app
from visionfm_core.tasks.adapters import ClassificationTask, SegmentationTask

TINY = ["--arch", "nano", "--image-size", "32", "--device", "cpu", "--threads", "1", "--batch-size", "4",
        "--epochs", "1", "--modality", "oct"]


@pytest.fixture(autouse=True)
def private_site_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISIONFM_STATE_DIR", str(tmp_path / "state"))


def _manifest(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = ["image,label"]
    for number in range(20):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"scan{number}.png")
        rows.append(f"{folder / f'scan{number}.png'},{'ab'[number % 2]}")
    manifest = folder / "labels.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


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
    manifest = _manifest(tmp_path)
    # 16 training scans at a batch of 4: 4 steps an epoch.
    assert _steps(manifest, tmp_path / "a.safetensors") == 12  # 3 epochs reach the task's 9
    assert _steps(manifest, tmp_path / "b.safetensors", "--min-steps", "2") == 4  # 1 epoch
