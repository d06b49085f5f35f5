"""`visionfm pretrain --devices 2` on CPU: two gloo workers launched by the command itself, one encoder
and one summary from rank 0; a worker killed mid-run stops the other and the command reports one error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def _workers(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


def test_a_killed_worker_stops_the_site_with_one_clear_error(tmp_path: Path) -> None:
    proc = subprocess.Popen(_command(tmp_path / "encoder.safetensors", 100_000), stdout=subprocess.PIPE,
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
    assert not (tmp_path / "encoder.safetensors").exists()
