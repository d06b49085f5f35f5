"""Starting and stopping Flower's processes: a private environment each, and whole trees stopped.

Flower's SuperLink and SuperNode start helpers in new sessions (SuperExec, ServerApp, ClientApp
processes), so killing a process group is not enough: `stop_tree` collects every descendant through
/proc first, then stops them all. Both the coordinator and the site side use this module.

Every process is started under a small watchdog (this module run with `-m`): the watchdog is a
child subreaper (orphaned grandchildren are re-parented to it, whatever session they made), and it
takes its whole tree down when the process that started it dies, `kill -9` included. Each process
also carries the folder it works for in its environment (`VISIONFM_OWNER`), so that a later start on
the same folder finds and stops what a crash left behind (`stop_stale`), and `FolderLock` keeps a
second coordinator or site off a folder that is in use.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

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


OWNER_ENV = "VISIONFM_OWNER"
WATCHDOG_POLL_S = 0.2
_PR_SET_CHILD_SUBREAPER = 36


def watched_command(command: Sequence[str], parent_pid: int | None = None) -> list[str]:
    """`command` run under this module's watchdog, which ends it (and all it started) with `parent_pid`."""
    parent = os.getpid() if parent_pid is None else parent_pid
    return [sys.executable, "-m", __name__, "--parent", str(parent), "--", *command]


def spawn(
    command: Sequence[str],
    env: Mapping[str, str],
    log_path: Path,
    cwd: Path | None = None,
    owner: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start `command` under a watchdog in its own session, stdout and stderr appended to `log_path`.

    The returned process is the watchdog: its pid stands for the whole tree, its exit code is the
    command's. With `owner`, the tree is marked as working for that folder (see `stop_stale`)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    environment = dict(env)
    if owner is not None:
        environment[OWNER_ENV] = str(owner.resolve())
    with log_path.open("ab") as log:
        return subprocess.Popen(
            watched_command(command),
            env=environment,
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


def _socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = list(fd_dir.iterdir())
    except OSError:
        return inodes
    for fd in fds:
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def tcp_peer_owner(peer: tuple[str, int], server_port: int, candidates: Sequence[int]) -> int | None:
    """Which of `candidates` owns the client end of the local TCP connection from `peer` to
    `server_port` on this host (Linux /proc), or None when none of them does."""
    wanted = f"{peer[1]:04X}"
    server = f"{server_port:04X}"
    inode = None
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/self/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            parts = line.split()
            if len(parts) < 10:
                continue
            local, remote = parts[1], parts[2]
            if local.endswith(":" + wanted) and remote.endswith(":" + server) and _decode_address(
                local.split(":")[0]
            ) in (peer[0], f"::ffff:{peer[0]}"):
                inode = parts[9]
                break
        if inode is not None:
            break
    if inode is None or inode == "0":
        return None
    for pid in candidates:
        if inode in _socket_inodes(pid):
            return pid
    return None


def _decode_address(address_hex: str) -> str:
    if len(address_hex) == 8:
        return socket.inet_ntop(socket.AF_INET, bytes.fromhex(address_hex)[::-1])
    raw = bytes.fromhex(address_hex)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def command_pid(process: subprocess.Popen[Any], timeout_s: float = 5.0) -> int:
    """The pid of the command a `spawn`ed watchdog runs (the watchdog's own pid if it has none yet)."""
    deadline = time.monotonic() + timeout_s
    while True:
        children = _children_map().get(process.pid, [])
        if children or time.monotonic() > deadline or process.poll() is not None:
            return min(children) if children else process.pid
        time.sleep(0.05)


def process_environment(pid: int) -> dict[str, str]:
    """The environment `pid` started with (empty when it cannot be read: another user's, or gone)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def owned_processes(owner: Path) -> list[int]:
    """Living processes marked as working for `owner` (this process and its ancestors excluded)."""
    marker = str(owner.resolve())
    spared = {os.getpid(), *_ancestors(os.getpid())}
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) in spared:
            continue
        if process_environment(int(entry.name)).get(OWNER_ENV) == marker and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


def _ancestors(pid: int) -> list[int]:
    found = []
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        found.append(pid)
    return found


def stop_stale(owner: Path, grace_s: float = 5.0) -> list[int]:
    """Stop every process a previous, crashed run left working for `owner`; returns their pids."""
    stale = owned_processes(owner)
    for pid in stale:
        stop_tree(pid, grace_s=grace_s)
    return stale


class FolderLock:
    """An exclusive lock on a state folder (`flock` on FOLDER/NAME, which holds the owner's pid).

    The kernel drops the lock when its holder dies, however it dies, so a crashed owner never blocks
    the next start; a living one does, and `acquire` names its pid."""

    def __init__(self, folder: Path, name: str, what: str) -> None:
        self.path = folder / name
        self.what = what
        self._handle: IO[str] | None = None

    def acquire(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise RuntimeError(f"{self.what} already runs on {self.path.parent} (pid {holder})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self._handle.close()
            self._handle = None


# The watchdog --------------------------------------------------------------------------------------


def _set_child_subreaper() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _reap(child_pid: int) -> int | None:
    """Collect every exited child (adopted orphans too); the command's exit code once it has exited."""
    code = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return code
        if pid == 0:
            return code
        if pid == child_pid:
            code = os.waitstatus_to_exitcode(status)


def _stop_everything(grace_s: float) -> None:
    """Stop every descendant of this watchdog (adopted ones included), reaping them as they exit."""
    victims = descendants(os.getpid())
    for victim in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(victim, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and descendants(os.getpid()):
        _reap(-1)
        time.sleep(0.05)
    for victim in descendants(os.getpid()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(victim, signal.SIGKILL)
    time.sleep(0.05)
    _reap(-1)


def watchdog(parent_pid: int, command: Sequence[str], grace_s: float = 5.0) -> int:
    """Run `command`; stop its whole tree when `parent_pid` dies or this watchdog is told to stop."""
    _set_child_subreaper()
    stop = False

    def request_stop(*_: object) -> None:
        nonlocal stop
        stop = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, request_stop)
    if os.getppid() != parent_pid:
        return 1  # the parent died before we started: start nothing
    child = subprocess.Popen(list(command))
    while True:
        code = _reap(child.pid)
        if code is not None:
            child.returncode = code
            _stop_everything(grace_s)  # helpers the command left behind
            return code
        if stop or os.getppid() != parent_pid:
            _stop_everything(grace_s)
            code = _reap(child.pid)
            return 0 if code is None else code
        time.sleep(WATCHDOG_POLL_S)


def _watchdog_main(argv: Sequence[str]) -> int:
    if len(argv) < 4 or argv[0] != "--parent" or argv[2] != "--":
        print("usage: python -m strategies.protocol.processes --parent PID -- COMMAND...", file=sys.stderr)
        return 2
    return watchdog(int(argv[1]), argv[3:])


if __name__ == "__main__":
    sys.exit(_watchdog_main(sys.argv[1:]))
