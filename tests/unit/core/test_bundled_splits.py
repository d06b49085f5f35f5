"""The bundled datasets' held-out test splits are the same on every machine and in every checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from visionfm_core.data.state import STATE_ENV

REPO = Path(__file__).resolve().parents[3]
SPLIT = ("from strategies.protocol.datasets import load_dataset; import json, pathlib; d = load_dataset('oct2017'); "
         "print(json.dumps([pathlib.Path(i.source).name for i in d.test]))")


def _oct_test_files(state_base: Path) -> list[str]:
    # A fresh process per state folder: each would otherwise make its own random patient-key salt.
    env = {**os.environ, STATE_ENV: str(state_base)}
    done = subprocess.run([sys.executable, "-c", SPLIT], capture_output=True, text=True, cwd=REPO, env=env,
                          check=True, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_oct_test_patients_do_not_depend_on_the_sites_salt(tmp_path: Path) -> None:
    first, second = _oct_test_files(tmp_path / "one"), _oct_test_files(tmp_path / "two")
    assert first == second and 4 <= len(first) <= 12
