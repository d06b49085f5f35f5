"""`visionfm-server start`: the coordinator's long-running process.

It starts the SuperLink on loopback (TLS, node authentication, SQLite state in the state folder),
registers the hospitals of the provisioning folder, opens the fleet gateway on the public address and
the operators' dashboard (loopback by default), and then watches: when the revocation register or the
hospitals change, registrations follow within seconds; the CRL is re-signed well before it expires (the
gateway reloads it, and any renewed certificate, by itself). Everything is stopped together on
SIGTERM/SIGINT or when the SuperLink dies, and with the coordinator's own death (`kill -9` included: see
strategies/protocol/processes.py). A lock on the state folder keeps a second coordinator off it; a start after a crash
first stops what was left.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from certs.errors import CertificateError
from certs.participants import load_participants, split_address
from certs.provision import CRL_REFRESH_BEFORE, refresh_crl
from certs.store import CertStore
from server.ops.control import ControlPlane, sync_registrations
from server.ops.gateway import DEFAULT_MAX_BODY_BYTES, GatewayConfig, GatewayThread
from server.ops.superlink import SuperLinkSpec, start_superlink
from strategies.protocol.processes import FolderLock, command_pid, free_port, pid_alive, stop_stale, stop_tree

logger = logging.getLogger(__name__)
STATE_FILE = "coordinator.json"
LOCK_FILE = "coordinator.lock"
CRL_CHECK_S = 60.0  # how often a running coordinator looks at its CRL (default of `start --crl-check-seconds`)


@dataclass
class CoordinatorState:
    """What other `visionfm-server` commands need to find a running coordinator."""

    pid: int
    superlink_pid: int
    superlink_port: int
    gateway_host: str
    gateway_port: int
    certs_dir: str
    started_at: float
    dashboard_url: str = ""  # empty when the dashboard is off

    @classmethod
    def load(cls, state_dir: Path) -> CoordinatorState | None:
        path = state_dir / STATE_FILE
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))

    def save(self, state_dir: Path) -> None:
        tmp = state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(state_dir / STATE_FILE)

    @property
    def running(self) -> bool:
        return pid_alive(self.pid) and pid_alive(self.superlink_pid)


class Service(Protocol):
    """Something served beside the gateway for the coordinator's lifetime (the dashboard)."""

    def start(self) -> str:
        """Start serving; returns where (a URL)."""
        ...

    def stop(self) -> None: ...


# Builds a service for a started coordinator (given its start time); the CLI passes the dashboard's.
ServiceFactory = Callable[["Coordinator", float], Service]


def running_state(state_dir: Path) -> CoordinatorState:
    """The state of the coordinator running on `state_dir`; RuntimeError when none runs."""
    state = CoordinatorState.load(state_dir)
    if state is None or not state.running:
        raise RuntimeError(f"no coordinator is running on {state_dir}: start it with `visionfm-server start`")
    return state


def _registration_inputs(store: CertStore) -> tuple[float, ...]:
    """Modification times that mean registrations may have to change."""
    paths = [store.revoked_register, store.participants, store.root / "hospitals"]
    return tuple(p.stat().st_mtime if p.exists() else 0.0 for p in paths)


class Coordinator:
    """The SuperLink, the registrations and the gateway, started and stopped as one."""

    def __init__(
        self,
        certs_dir: Path,
        state_dir: Path,
        listen: str | None = None,
        superlink_port: int | None = None,
        dashboard: ServiceFactory | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        crl_check_s: float = CRL_CHECK_S,
    ) -> None:
        self.store = CertStore(certs_dir.resolve()).require()
        self.crl_check_s = crl_check_s
        self.state_dir = state_dir.resolve()
        self.max_body_bytes = max_body_bytes
        self.lock = FolderLock(self.state_dir, LOCK_FILE, "a coordinator")
        self._crl_checked = 0.0
        participants = load_participants(self.store.participants)
        self.listen_host, self.listen_port = split_address(
            listen or participants.coordinator.address, "listen"
        )
        self.superlink_port = superlink_port or free_port()
        self.spec = SuperLinkSpec(self.superlink_port, self.store, self.state_dir)
        self.gateway: GatewayThread | None = None
        self.dashboard_factory = dashboard
        self.dashboard: Service | None = None
        self.superlink: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()

    def start(self) -> CoordinatorState:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()  # RuntimeError naming the pid when a coordinator runs on this folder
        stale = stop_stale(self.state_dir)
        if stale:
            logger.warning("stopped %d process(es) left by a previous coordinator on %s", len(stale), self.state_dir)
        try:
            self.refresh_crl()
            self.superlink = start_superlink(self.spec)
            self.sync()
            config = GatewayConfig.from_store(
                self.store, self.listen_host, self.listen_port, self.superlink_port
            )
            config.max_body_bytes = self.max_body_bytes
            self.gateway = GatewayThread(config)
            port = self.gateway.start()
            started_at = time.time()
            dashboard_url = ""
            if self.dashboard_factory is not None:
                self.dashboard = self.dashboard_factory(self, started_at)
                dashboard_url = self.dashboard.start()
        except BaseException:
            self.shutdown()
            raise
        state = CoordinatorState(
            os.getpid(),
            command_pid(self.superlink),  # the SuperLink itself, not its watchdog
            self.superlink_port,
            self.listen_host,
            port,
            str(self.store.root.resolve()),
            started_at,
            dashboard_url,
        )
        state.save(self.state_dir)
        return state

    def refresh_crl(self, min_left: dt.timedelta = CRL_REFRESH_BEFORE) -> bool:
        """Re-sign the CRL when it expires within `min_left` (True when it did). Without the CA key
        (kept offline) it logs what to do; `visionfm-server status` and `certs verify` say it too."""
        self._crl_checked = time.monotonic()
        try:
            refreshed = refresh_crl(self.store.root, min_left)
        except (CertificateError, OSError) as exc:
            logger.error("cannot refresh the CRL %s: %s; run `visionfm-server certs refresh-crl`", self.store.crl, exc)
            return False
        if refreshed:
            logger.info("CRL %s re-signed before it expires", self.store.crl)
        return refreshed

    def sync(self) -> None:
        with ControlPlane(self.superlink_port, self.store) as control:
            report = sync_registrations(control, self.store)
        for name in report.registered:
            logger.info("registered hospital %s", name)
        for name in report.unregistered:
            logger.warning("unregistered revoked hospital %s", name)

    def watch(self, poll_s: float = 1.0, on_tick: Callable[[], None] | None = None) -> int:
        """Block until stopped or the SuperLink exits; returns the exit code for the CLI."""
        seen = _registration_inputs(self.store)
        while not self._stop.wait(poll_s):
            if self.superlink is not None and self.superlink.poll() is not None:
                logger.error(
                    "the SuperLink exited (code %s); see %s", self.superlink.returncode, self.spec.log
                )
                return 1
            current = _registration_inputs(self.store)
            if current != seen:
                seen = current
                try:
                    self.sync()
                except Exception as exc:  # keep serving; the next change retries
                    logger.error("could not update registrations: %s", exc)
            if time.monotonic() - self._crl_checked > self.crl_check_s:
                self.refresh_crl()
            if on_tick is not None:
                on_tick()
        return 0

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        if self.dashboard is not None:
            self.dashboard.stop()
            self.dashboard = None
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None
        if self.superlink is not None:
            stop_tree(self.superlink)
            self.superlink = None
        state_file = self.state_dir / STATE_FILE
        if state_file.exists():
            state_file.unlink()
        self.lock.release()


def run_coordinator(
    certs_dir: Path,
    state_dir: Path,
    listen: str | None = None,
    superlink_port: int | None = None,
    on_ready: Callable[[CoordinatorState], None] | None = None,
    dashboard: ServiceFactory | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    crl_check_s: float = CRL_CHECK_S,
) -> int:
    """Start, serve until SIGTERM/SIGINT, stop everything; the exit code for the CLI. `dashboard` builds
    the operators' dashboard once the gateway runs (None: no dashboard); the CRL is looked at every
    `crl_check_s` seconds and re-signed when it nears expiry."""
    coordinator = Coordinator(certs_dir, state_dir, listen, superlink_port, dashboard, max_body_bytes, crl_check_s)
    signal.signal(signal.SIGTERM, coordinator.request_stop)
    signal.signal(signal.SIGINT, coordinator.request_stop)
    state = coordinator.start()
    try:
        if on_ready is not None:
            on_ready(state)
        return coordinator.watch()
    finally:
        coordinator.shutdown()
