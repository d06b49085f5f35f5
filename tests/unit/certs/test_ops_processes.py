"""Process hygiene: a tree started under the watchdog dies with its starter (kill -9 included), a
second owner of a folder is refused, stale processes of a crashed owner are found by their marker,
and a local connection is traced to the process that opened it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from strategies.protocol.processes import (
    OWNER_ENV,
    FolderLock,
    descendants,
    owned_processes,
    pid_alive,
    stop_stale,
    stop_tree,
    tcp_peer_owner,
)

# A starter that spawns (through strategies.protocol.processes.spawn) a child which itself starts a grandchild in
# its own session, as Flower's SuperLink starts SuperExec; it prints the pids, then waits.
STARTER = """
import sys, time
from pathlib import Path
from strategies.protocol.processes import spawn, descendants
child = ("import subprocess, sys, time; "
         "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True); "
         "time.sleep(120)")
process = spawn([sys.executable, "-c", child], {**__import__("os").environ}, Path(sys.argv[1]), owner=Path(sys.argv[2]))
deadline = time.monotonic() + 30
while len(descendants(process.pid)) < 2 and time.monotonic() < deadline:
    time.sleep(0.1)
print(" ".join(map(str, [process.pid, *descendants(process.pid)])), flush=True)
time.sleep(120)
"""


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if pid_alive(p)]


def _start(tmp_path: Path) -> tuple[subprocess.Popen[str], list[int]]:
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(tmp_path / "log.txt"), str(tmp_path / "owner")],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    assert starter.stdout is not None
    tree = [int(p) for p in starter.stdout.readline().split()]
    assert len(tree) >= 3, tree  # watchdog, command, grandchild in its own session
    return starter, tree


def test_kill_9_of_the_starter_takes_the_whole_tree_down(tmp_path: Path) -> None:
    starter, tree = _start(tmp_path)
    try:
        os.kill(starter.pid, signal.SIGKILL)
        starter.wait(10)
        assert _wait_gone(tree, 15) == []
    finally:
        stop_tree(starter, grace_s=1)
        for pid in tree:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_stale_processes_are_found_by_their_owner_marker(tmp_path: Path) -> None:
    starter, tree = _start(tmp_path)
    try:
        watchdog = tree[0]
        os.kill(watchdog, signal.SIGKILL)  # even the watchdog gone: the command and grandchild are orphans
        survivors = _wait_gone(tree[1:], 1.0)
        assert survivors, "expected orphans once the watchdog itself is killed"
        marked = owned_processes(tmp_path / "owner")
        assert set(survivors) <= set(marked)
        stopped = stop_stale(tmp_path / "owner", grace_s=2)
        assert set(survivors) <= set(stopped)
        assert _wait_gone(tree, 10) == []
        assert owned_processes(tmp_path / "other") == []
    finally:
        stop_tree(starter, grace_s=1)


def test_watchdog_passes_the_exit_code_and_reaps_helpers(tmp_path: Path) -> None:
    from strategies.protocol.processes import spawn

    process = spawn([sys.executable, "-c", "import sys; sys.exit(7)"], dict(os.environ), tmp_path / "log")
    assert process.wait(30) == 7
    assert descendants(process.pid) == []


def test_a_second_owner_of_a_folder_is_refused_naming_the_first(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from strategies.protocol.processes import FolderLock; "
            "lock = FolderLock(Path(sys.argv[1]), 'x.lock', 'a coordinator').acquire(); print('held', flush=True); "
            "time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=rf"a coordinator already runs on .* \(pid {holder.pid}\)"):
            FolderLock(tmp_path, "x.lock", "a coordinator").acquire()
        os.kill(holder.pid, signal.SIGKILL)  # a crash releases the lock
        holder.wait(10)
        FolderLock(tmp_path, "x.lock", "a coordinator").acquire().release()
    finally:
        stop_tree(holder, grace_s=1)


def test_a_local_connection_is_traced_to_its_process(tmp_path: Path) -> None:
    del tmp_path
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as mine:
            accepted, peer = server.accept()
            with accepted:
                assert tcp_peer_owner(peer, port, [os.getpid()]) == os.getpid()
                assert tcp_peer_owner(peer, port, [os.getppid()]) is None
            del mine
        other = subprocess.Popen(
            [sys.executable, "-c", f"import socket, time; s = socket.create_connection(('127.0.0.1', {port})); "
             "time.sleep(30)"],
        )
        try:
            accepted, peer = server.accept()
            with accepted:
                assert tcp_peer_owner(peer, port, [os.getpid()]) is None
                assert tcp_peer_owner(peer, port, [other.pid]) == other.pid
        finally:
            stop_tree(other, grace_s=1)


def test_owner_marker_is_in_the_environment(tmp_path: Path) -> None:
    from strategies.protocol.processes import command_pid, process_environment, spawn

    process = spawn([sys.executable, "-c", "import time; time.sleep(30)"], dict(os.environ), tmp_path / "log",
                    owner=tmp_path)
    try:
        deadline = time.monotonic() + 10
        while not descendants(process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        (command,) = descendants(process.pid)
        assert command_pid(process) == command  # what CoordinatorState records as the SuperLink's pid
        assert process_environment(command)[OWNER_ENV] == str(tmp_path.resolve())
    finally:
        stop_tree(process, grace_s=2)
