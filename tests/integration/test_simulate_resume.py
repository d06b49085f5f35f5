"""The coordinator process is killed after round 1 of 2; `--resume` finishes the run from the round-1
checkpoint without repeating or double-counting round 1 (one local step a round: what is under test is
the round bookkeeping, not training)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _simulate(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "simulations.cli", "simulate", "--scenario", "quick", "--num-rounds", "2",
            "--local-steps", "1", "--out", str(out), *extra]


def test_killed_simulation_resumes_from_last_complete_round(tmp_path: Path) -> None:
    out = tmp_path / "run"
    marker = out / "checkpoints" / "round-0001" / "round.json"
    proc = subprocess.Popen(_simulate(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while not marker.exists():
            assert proc.poll() is None, "simulation ended before round 1 was checkpointed"
            assert time.monotonic() < deadline, "round 1 never finished"
            time.sleep(0.1)  # kill it in round 2, long before round 2 can finish
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    round1 = (out / "checkpoints" / "round-0001" / "fundus.safetensors").read_bytes()
    assert not (out / "checkpoints" / "round-0002").exists()

    done = subprocess.run(_simulate(out, "--resume"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "colour" in done.stdout and "statistics" in done.stdout  # the reference row beside the scores
    assert (out / "checkpoints" / "round-0001" / "fundus.safetensors").read_bytes() == round1
    assert (out / "checkpoints" / "round-0002" / "round.json").is_file()
    rows = json.loads((out / "metrics.json").read_text())
    train_rows = [(r["round"], r["site"], r["modality"]) for r in rows if r["phase"] == "train"]
    assert len(train_rows) == len(set(train_rows)), "a round was counted twice"
    assert {r for r, _, _ in train_rows} == {1, 2}
    assert sum(1 for r in train_rows if r[0] == 1) == 4  # 3 fundus sites + 1 OCT site, once each
