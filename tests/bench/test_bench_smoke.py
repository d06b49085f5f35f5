"""Every bench script still runs: `bench/<name>.py --smoke` (tiny sizes) exits 0 and prints a ratio line.

Parametrised by a glob, so a bench added later is covered without touching this file. Files starting with
an underscore are the benches' shared helpers, not benches. Each runs in a scratch folder (what a bench
writes under `runs/` lands there), with the checkout first on the import path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHES = sorted(p for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_"))


def test_the_glob_finds_the_benches() -> None:
    assert len(BENCHES) >= 10


@pytest.mark.parametrize("bench", BENCHES, ids=[p.stem for p in BENCHES])
def test_bench_smoke_runs_and_prints_its_ratio(bench: Path, tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    done = subprocess.run([sys.executable, str(bench), "--smoke"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1100, check=False)
    tail = f"\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    assert done.returncode == 0, f"{bench.name} --smoke exited {done.returncode}{tail}"
    assert any("ratio" in line.lower() for line in done.stdout.splitlines()), f"no ratio line{tail}"
    assert any(line.startswith("CPU: ") for line in done.stdout.splitlines()), f"no CPU model line{tail}"
