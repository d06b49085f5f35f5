"""Kill one worker of a multi-device run mid-training and collect what the launcher says."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

# The one line a launcher prints when its second worker is killed.
KILLED_WORKER_ERROR = "error: worker 1 of 2 was killed by SIGKILL; the other workers were stopped"


@dataclass
class KilledRun:
    returncode: int
    output: str
    survivor: int  # the pid of worker 0

    @property
    def errors(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith("error:")]

    @property
    def survivor_gone(self) -> bool:
        status = Path(f"/proc/{self.survivor}/status")
        return not status.parent.exists() or "zombie" in status.read_text()


def _children(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


def kill_second_worker(command: list[str], env: dict[str, str]) -> KilledRun:
    """Run `command` (a launcher of 2 workers), SIGKILL worker 1 once training is under way, and wait."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        workers: list[int] = []
        while proc.poll() is None and len(workers) < 2:
            time.sleep(0.5)
            # The spawn start method adds a resource tracker child too: the workers run spawn_main.
            workers = [p for p in _children(proc.pid)
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
    return KilledRun(proc.returncode, output, workers[0])
