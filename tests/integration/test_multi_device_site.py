"""`visionfm pretrain --devices 2` on CPU: two gloo workers launched by the command itself, one encoder
and one summary from rank 0; a worker killed mid-run stops the other and the command reports one error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.worker_kill import KILLED_WORKER_ERROR, kill_second_worker
from visionfm_core.models.checkpoint import load_encoder

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[2] / "simulations" / "data" / "retinamnist" / "retinamnist.npz"
TINY = ["--arch", "nano", "--image-size", "32", "--patch-size", "8", "--local-crops", "2", "--device", "cpu",
        "--objective", "dino", "--batch-size", "4"]


def _command(out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "simulations.cli", "pretrain", str(DATA), "--out", str(out), "--devices", "2",
            "--steps", str(steps), *TINY]


def _environment(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "VISIONFM_STATE_DIR": str(tmp_path / "state")}


def test_two_workers_write_one_encoder_and_report_world_size(tmp_path: Path) -> None:
    out = tmp_path / "encoder.safetensors"
    done = subprocess.run(_command(out, 2), capture_output=True, text=True, timeout=900, env=_environment(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["world_size"] == 2 and summary["batch_size"] == 8 and summary["steps"] == 2
    assert summary["images"] == 1080 and summary["final_loss"] > 0
    state, meta = load_encoder(out)
    assert meta["steps"] == 2 and state
    # One voice: rank 0 reports the run, its steps and its end; the other worker says nothing.
    assert done.stderr.count("pretraining nano (dino) on") == 1, done.stderr
    assert done.stderr.count("step 2/2") == 1 and done.stderr.count("pretrained on") == 1, done.stderr


def test_a_killed_worker_stops_the_site_with_one_clear_error(tmp_path: Path) -> None:
    run = kill_second_worker(_command(tmp_path / "encoder.safetensors", 100_000), _environment(tmp_path))
    assert run.returncode == 2, run.output[-2000:]
    assert run.errors == [KILLED_WORKER_ERROR], run.output[-2000:]
    assert run.survivor_gone
    assert not (tmp_path / "encoder.safetensors").exists()
