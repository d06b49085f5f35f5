"""Helpers for the operations half of the hostile suite: real coordinators and sites on loopback (the
deployment suite's launchers), CLI runs, process trees, memory and timing of recoveries."""

from __future__ import annotations

import base64
import datetime as dt
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from certs.authority import crl_pem, load_cert, utcnow
from certs.keys import load_openssh_public_key, load_private_key, write_public
from certs.provision import issue
from certs.store import CertStore
from strategies.protocol.processes import descendants, free_port, pid_alive, wait_for_port
from tests.integration.deployment.conftest import (
    REPO,
    CoordinatorHandle,
    Federation,
    Processes,
    start_coordinator,
    wait_until,
    write_participants,
)


def cli(module: str, *args: str, cwd: Path = REPO, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run `python -m MODULE ARGS` (visionfm-server: server.cli; visionfm-client: client.cli)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, check=False,
        env={**os.environ, "COLUMNS": "200"},
    )


def write_crl(store: CertStore, issued_days_ago: float, valid_days: float = 30, ca_key: Path | None = None) -> None:
    """Replace the CRL with one the CA signed `issued_days_ago` days ago, valid for `valid_days` (signed with
    the CA key at `ca_key` when it is kept away from the store)."""
    ca, key = load_cert(store.ca_cert), load_private_key(ca_key or store.ca_key)
    issued = utcnow() - dt.timedelta(days=issued_days_ago)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(issued)
        .next_update(issued + dt.timedelta(days=valid_days))
        .sign(key, hashes.SHA384())
    )
    write_public(store.crl, crl_pem(crl))


def crl_next_update(store: CertStore) -> dt.datetime:
    next_update = x509.load_pem_x509_crl(store.crl.read_bytes()).next_update_utc
    assert next_update is not None
    return next_update


def timed(predicate: Callable[[], object], timeout_s: float, poll_s: float = 0.2) -> float | None:
    """Seconds until `predicate()` is truthy, None on timeout."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if predicate():
            return time.monotonic() - started
        time.sleep(poll_s)
    return None


def tree_rss_mb(pid: int) -> float:
    """Resident memory of `pid` and its descendants, in MiB (Linux /proc)."""
    total_kb = 0
    for member in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


def living(pids: list[int]) -> list[int]:
    return [p for p in pids if pid_alive(p)]


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes_named(root_pid: int, name: str) -> list[int]:
    return [p for p in descendants(root_pid)
            if name in command_line(p) and "strategies.protocol.processes" not in command_line(p)]


def node_key_header(store: CertStore, hospital: str) -> dict[str, str]:
    public = load_openssh_public_key(store.hospital(hospital).node_pub)
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return {"flwr-public-key": base64.b64encode(pem).decode(), "content-type": "application/protobuf"}


def idle_connections(port: int, count: int) -> list[socket.socket]:
    """`count` TCP connections to 127.0.0.1:port that never start TLS."""
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]


def start_coordinator_with(
    processes: Processes, federation: Federation, state_dir: Path, *extra: str, cwd_args: tuple[str, str] | None = None
) -> CoordinatorHandle:
    """`visionfm-server start` with extra options (the deployment suite's launcher has none)."""
    log = state_dir.parent / f"{state_dir.name}.out"
    state_dir.mkdir(parents=True, exist_ok=True)
    certs, state = cwd_args or (str(federation.store.root), str(state_dir))
    process = processes.launch(["-m", "server.cli", "start", "--certs", certs, "--state", state, *extra], log)
    wait_until(
        lambda: (state_dir / "coordinator.json").exists() or process.poll() is not None, 120, "the coordinator to start"
    )
    assert process.poll() is None, log.read_text()
    assert wait_for_port("127.0.0.1", federation.gateway_port, 10)
    return CoordinatorHandle(process, state_dir, log)


def launch_in(processes: Processes, args: list[str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start `python ARGS` in `cwd` (relative paths resolve there), tracked for teardown like
    `Processes.launch`."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return processes.launch(args, log, env={"COLUMNS": "200", "PYTHONPATH": pythonpath}, cwd=cwd)


# Fixtures (the deployment suite's, under names a test module can import without shadowing): import
# `processes_fixture`, `federation_fixture`, `coordinator_fixture` and ask for processes/federation/coordinator.
@pytest.fixture(name="processes")
def processes_fixture() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture(name="federation")
def federation_fixture(tmp_path: Path) -> Federation:
    port = free_port()
    issue(write_participants(tmp_path / "participants.toml", port), tmp_path / "pki")
    return Federation(tmp_path, CertStore(tmp_path / "pki"), port)


@pytest.fixture(name="coordinator")
def coordinator_fixture(processes: Processes, federation: Federation) -> CoordinatorHandle:
    return start_coordinator(processes, federation, federation.root / "coordinator")
