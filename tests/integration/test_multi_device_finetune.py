"""`visionfm finetune --devices 2` on CPU: two gloo workers launched by the command itself, one task model
and one summary from rank 0; a worker killed mid-run stops the other and the command reports one error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.integration.worker_kill import KILLED_WORKER_ERROR, kill_second_worker
from visionfm_core.tasks.persistence import load_task_model

pytestmark = pytest.mark.integration

TINY = ["--task", "classification", "--arch", "nano", "--image-size", "32", "--patch-size", "8", "--device", "cpu",
        "--devices", "2", "--batch-size", "4", "--min-steps", "0", "--val-fraction", "0.25"]


def _class_folders(root: Path) -> Path:
    """Two classes of small photographs as a folder of class folders (dark and bright)."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(("healthy", "disease")):
        folder = root / name
        folder.mkdir(parents=True)
        for number in range(24):
            pixels = (rng.integers(0, 90, (40, 40, 3)) + 120 * label).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}{number}.png")
    return root


def _command(data: Path, out: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "simulations.cli", "finetune", str(data), "--out", str(out), "--epochs",
            str(epochs), *TINY]


def _environment(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "VISIONFM_STATE_DIR": str(tmp_path / "state")}


def test_two_workers_write_one_task_model_and_report_world_size(tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    # --test-flips must reach the workers: rank 0 saves the model, so the flag is in it only if it did.
    done = subprocess.run([*_command(_class_folders(tmp_path / "data"), out, 2), "--test-flips"], capture_output=True,
                          text=True, timeout=900, env=_environment(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    # 36 training images, 4 per device and step: 4 steps an epoch of the whole batch of 8.
    assert summary["world_size"] == 2 and summary["batch_size"] == 8 and summary["steps"] == 8
    assert summary["selection_metric"] == "auc" and len(summary["history"]) == 2
    loaded = load_task_model(out)
    assert loaded.task.kind == "classification" and list(tmp_path.glob("*.safetensors")) == [out]
    assert loaded.preprocess.test_flips is True
    # One voice: rank 0 reports the run, its epochs and its end; the other worker says nothing.
    assert done.stderr.count("on 2 devices") == 1, done.stderr
    assert done.stderr.count("fine-tuned on 36 images") == 1, done.stderr
    assert done.stderr.count("epoch 2/2") == 1, done.stderr


def test_a_killed_worker_stops_the_run_with_one_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    run = kill_second_worker(_command(_class_folders(tmp_path / "data"), out, 100_000), _environment(tmp_path))
    assert run.returncode == 2, run.output[-2000:]
    assert run.errors == [KILLED_WORKER_ERROR], run.output[-2000:]
    assert run.survivor_gone
    assert not out.exists()
