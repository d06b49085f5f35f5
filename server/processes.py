"""Starting and stopping Flower's processes: a private environment each, and whole trees stopped.

Flower's SuperLink and SuperNode start helpers in new sessions (SuperExec, ServerApp, ClientApp
processes), so killing a process group is not enough: `stop_tree` collects every descendant through
/proc first, then stops them all. Both the coordinator and the site side use this module.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from visionfm_core.telemetry import PRIVACY_DEFAULTS


def flower_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a Flower process: its own FLWR_HOME, telemetry, update checks and runtime
    installs off, Ray's temp inside `home`, and this interpreter's scripts first on PATH (Flower
    starts `flower-superexec`/`flwr-clientapp` by name)."""
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(PRIVACY_DEFAULTS)  # forced, not defaults: a hospital process never phones home
    env["FLWR_HOME"] = str(home)
    env["RAY_TMPDIR"] = str(home / "ray")
    scripts = str(Path(sys.executable).parent)
    env["PATH"] = scripts + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def flower_script(name: str) -> str:
    """The path of a Flower console script installed beside this interpreter."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def spawn(
    command: Sequence[str], env: Mapping[str, str], log_path: Path, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start `command` in its own session, stdout and stderr appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(command),
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
        )


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return children
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    """Every living descendant of `pid` (children first-level first)."""
    tree = _children_map()
    found: list[int] = []
    queue = [pid]
    while queue:
        for child in tree.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return True
    return state != "Z"  # a zombie has exited; only its parent's wait() is missing


def stop_tree(process: subprocess.Popen[Any] | int, grace_s: float = 5.0, sig: int = signal.SIGTERM) -> None:
    """Send `sig` to a process and all its descendants, wait up to `grace_s`, then SIGKILL what is left.

    Pass the Popen when this process started it, so its exit status is collected (no zombie)."""
    pid = process if isinstance(process, int) else process.pid
    victims = [pid, *descendants(pid)]
    for victim in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(victim, sig)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(pid_alive(v) for v in victims):
        time.sleep(0.1)
    for victim in [*victims, *descendants(pid)]:
        if pid_alive(victim):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(victim, signal.SIGKILL)
    if not isinstance(process, int):
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace_s)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> bool:
    """True once something accepts TCP connections on host:port; False on timeout or if `process` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        time.sleep(0.2)
    return False


def listening_addresses(pid: int) -> list[tuple[str, int]]:
    """(IPv4 address, port) of every TCP socket in LISTEN state owned by `pid` (Linux /proc)."""
    inodes: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir() if fd_dir.is_dir() else []:
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found: list[tuple[str, int]] = []
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            parts = line.split()
            if len(parts) < 10 or parts[3] != "0A" or parts[9] not in inodes:  # 0A = LISTEN
                continue
            address_hex, port_hex = parts[1].split(":")
            found.append((_decode_address(address_hex), int(port_hex, 16)))
    return found


def _decode_address(address_hex: str) -> str:
    if len(address_hex) == 8:
        return socket.inet_ntop(socket.AF_INET, bytes.fromhex(address_hex)[::-1])
    raw = bytes.fromhex(address_hex)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)
