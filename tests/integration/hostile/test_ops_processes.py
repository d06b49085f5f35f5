"""Hostile replay: crashes and the documented commands with relative paths. `kill -9` of
`visionfm-server start` or `visionfm-client join` must take every child with it; a restart finds
nothing left over and never runs a second SuperLink on the same state folder; a SuperNode that
cannot start makes `join` fail with the SuperNode's own error."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from server.ops.coordinator import CoordinatorState
from strategies.protocol.processes import OWNER_ENV, descendants, process_environment, stop_tree
from tests.integration.deployment.conftest import (
    Federation,
    Processes,
    online_nodes,
    site_data,
    start_coordinator,
    wait_until,
)
from tests.integration.hostile._ops_support import (  # noqa: F401
    cli,
    coordinator_fixture,
    federation_fixture,
    launch_in,
    living,
    processes_fixture,
    processes_named,
    start_coordinator_with,
    timed,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


def _superlinks_on(state_dir: Path) -> list[int]:
    owner = str(state_dir.resolve())
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            pid = int(entry.name)
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes() if Path(f"/proc/{pid}/cmdline").exists() else b""
            is_superlink = b"flower-superlink" in cmd and b"strategies.protocol.processes" not in cmd
            if is_superlink and process_environment(pid).get(OWNER_ENV) == owner:
                found.append(pid)
    return found


def test_coordinator_with_relative_paths_dies_whole_on_kill_9_and_restarts_single(
    processes: Processes, federation: Federation
) -> None:
    root = federation.root
    state = root / "coordinator"
    relative = ("pki/", "coordinator/")  # the documented command, run from the folder that holds them
    args = ["-m", "server.cli", "start", "--certs", relative[0], "--state", relative[1]]
    first = launch_in(processes, args, root, root / "coordinator-1.out")
    wait_until(lambda: (state / "coordinator.json").exists() or first.poll() is not None, 120, "the coordinator")
    assert first.poll() is None, (root / "coordinator-1.out").read_text()
    assert (state / "superlink.db").exists() and not (state / "coordinator").exists()
    children = descendants(first.pid)
    assert len(_superlinks_on(state)) == 1 and len(children) >= 2
    second = cli("server.cli", "start", "--certs", relative[0], "--state", relative[1], cwd=root, timeout=60)
    assert second.returncode != 0 and "a coordinator already runs on" in second.stdout, second.stdout
    print(f"second start refused: {second.stdout.strip()}")
    os.kill(first.pid, signal.SIGKILL)
    gone = timed(lambda: not living(children), 20)
    assert gone is not None, [(p, Path(f"/proc/{p}/cmdline").read_bytes()[:80]) for p in living(children)]
    print(f"kill -9 of visionfm-server start: {len(children)} children gone after {gone:.1f}s")
    restarted_at = time.monotonic()
    again = launch_in(processes, args, root, root / "coordinator-2.out")
    wait_until(
        lambda: (CoordinatorState.load(state) or CoordinatorState(0, 0, 0, "", 0, "", 0)).pid == again.pid
        or again.poll() is not None,
        120,
        "the restarted coordinator",
    )
    assert again.poll() is None, (root / "coordinator-2.out").read_text()
    print(f"restart after kill -9 ready in {time.monotonic() - restarted_at:.1f}s")
    assert len(_superlinks_on(state)) == 1
    status = cli("server.cli", "status", "--state", relative[1], cwd=root)
    assert status.returncode == 0, status.stdout + status.stderr


def test_join_with_relative_paths_dies_whole_on_kill_9_and_rejoins(
    processes: Processes, federation: Federation, tmp_path: Path
) -> None:
    coordinator = start_coordinator(processes, federation, federation.root / "coordinator")
    root = federation.root
    site_data(root / "data", count=1)
    args = [
        "-m", "client.cli", "join", "--bundle", "pki/bundles/hospital-a", "--data", "data/site-0.npz",
        "--modalities", "fundus", "--work", "site-a", "--gpu", "-1", "--cold",
    ]
    join = launch_in(processes, args, root, root / "site-a-1.out")
    wait_until(lambda: "hospital-a" in online_nodes(coordinator) or join.poll() is not None, 180, "site a online")
    assert join.poll() is None, (root / "site-a-1.out").read_text()
    supernodes = processes_named(join.pid, "flower-supernode")
    executors = processes_named(join.pid, "flower-superexec")
    children = descendants(join.pid)
    assert supernodes and executors
    again = launch_in(processes, args, root, root / "site-a-dup.out")
    again.wait(60)
    assert again.returncode == 1 and "already runs on" in (root / "site-a-dup.out").read_text()
    os.kill(join.pid, signal.SIGKILL)
    gone = timed(lambda: not living(children), 20)
    assert gone is not None, living(children)
    print(f"kill -9 of visionfm-client join: {len(children)} children (SuperNode, SuperExec) gone after {gone:.1f}s")
    started = time.monotonic()
    rejoin = launch_in(processes, args, root, root / "site-a-2.out")
    wait_until(
        lambda: processes_named(rejoin.pid, "flower-supernode") and "hospital-a" in online_nodes(coordinator),
        180,
        "site a online again",
    )
    print(f"site online again {time.monotonic() - started:.1f}s after restarting join")
    stop_tree(rejoin)


def test_a_supernode_that_cannot_start_makes_join_fail_with_its_error(
    processes: Processes, federation: Federation, tmp_path: Path
) -> None:
    start_coordinator(processes, federation, federation.root / "coordinator")
    data = tmp_path / "scans\nexport"  # a legal folder name the SuperNode's --node-config cannot carry
    data.mkdir()
    (site,) = site_data(tmp_path / "npz", count=1)
    (data / "site.npz").write_bytes(site.read_bytes())
    log = tmp_path / "join.out"
    join = launch_in(
        processes,
        ["-m", "client.cli", "join", "--bundle", str(federation.bundle("hospital-a")), "--data", str(data),
         "--modalities", "fundus", "--work", str(tmp_path / "site"), "--gpu", "-1", "--cold"],
        tmp_path,
        log,
    )
    join.wait(120)
    output = log.read_text()
    print(output[-600:])
    assert join.returncode == 1
    assert "the SuperNode could not start" in output and "invalid format" in output
