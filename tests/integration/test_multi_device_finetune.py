"""`visionfm finetune --devices 2` on CPU: two gloo workers launched by the command itself, one task model
and one summary from rank 0; a worker killed mid-run stops the other and the command reports one error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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
    done = subprocess.run(_command(_class_folders(tmp_path / "data"), out, 2), capture_output=True, text=True,
                          timeout=900, env=_environment(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    # 36 training images, 4 per device and step: 4 steps an epoch of the whole batch of 8.
    assert summary["world_size"] == 2 and summary["batch_size"] == 8 and summary["steps"] == 8
    assert summary["selection_metric"] == "auc" and len(summary["history"]) == 2
    loaded = load_task_model(out)
    assert loaded.task.kind == "classification" and list(tmp_path.glob("*.safetensors")) == [out]
    # One voice: rank 0 reports the run, its epochs and its end; the other worker says nothing.
    assert done.stderr.count("on 2 devices") == 1, done.stderr
    assert done.stderr.count("fine-tuned on 36 images") == 1, done.stderr
    assert done.stderr.count("epoch 2/2") == 1, done.stderr


def _workers(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


def test_a_killed_worker_stops_the_run_with_one_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    proc = subprocess.Popen(_command(_class_folders(tmp_path / "data"), out, 100_000), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_environment(tmp_path))
    try:
        workers: list[int] = []
        while proc.poll() is None and len(workers) < 2:
            time.sleep(0.5)
            # The spawn start method adds a resource tracker child too: the workers run spawn_main.
            workers = [p for p in _workers(proc.pid)
                       if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text(errors="ignore")]
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        time.sleep(5.0)  # into training, the usual moment for a worker to die (out of memory, a GPU fault)
        workers.sort()  # spawned in rank order
        os.kill(workers[1], signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, output[-2000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors == ["error: worker 1 of 2 was killed by SIGKILL; the other workers were stopped"], output[-2000:]
    assert not Path(f"/proc/{workers[0]}").exists() or "zombie" in Path(f"/proc/{workers[0]}/status").read_text()
    assert not out.exists()
