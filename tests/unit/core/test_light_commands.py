"""The operators' and hospitals' commands that only talk to processes start without torch or matplotlib (seconds of CPU
per call: `visionfm-client join` on every site start, `visionfm-server status / logs / run / export` on
every operator action, and `visionfm-server start` with its dashboard). Only the ClientApp's executor and the
ServerApp need torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("modules", [
    "client.cli, client.join",
    "server.cli, server.ops.runs, server.ops.deploy_app, server.ops.jobs, server.ops.coordinator, "
    "server.ops.dashboard.serve",
])
def test_the_command_line_modules_import_without_torch(modules: str) -> None:
    heavy = ("torch", "timm", "torchvision", "matplotlib")
    code = f"import sys, {modules}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"{modules} imported {done.stdout.strip()}"


def test_the_server_app_imports_opacus_only_for_a_run_with_central_dp() -> None:
    # Every ServerApp start (each submitted run) would otherwise pay Opacus' import, about a second of CPU.
    code = ("import sys, server.federation.app; from strategies.central_dp import SiteLevelAccountant; "
            "before = 'opacus' in sys.modules; accountant = SiteLevelAccountant(1.0); accountant.step(); "
            "print(before, 'opacus' in sys.modules, accountant.epsilon(1e-5) > 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True", "True"]
