"""Serve the dashboard from the coordinator's process: uvicorn in a background thread, HTTPS with the
coordinator's certificate and the gateway's client-certificate checks (certs.tls.server_context)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from certs.store import CertStore
from certs.tls import server_context
from server.ops.dashboard.access import OperatorPolicy, TLSIdentityH11Protocol
from server.ops.dashboard.page import make_app
from server.ops.dashboard.snapshot import Snapshot, take_snapshot
from server.ops.gateway import GatewayStats
from visionfm_core.errors import ConfigError

if TYPE_CHECKING:
    from server.ops.coordinator import Coordinator

logger = logging.getLogger(__name__)


def dashboard_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' of the dashboard (port 0: any free port); ConfigError when malformed."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError("dashboard", f"{address!r} is not host:port (port 0: any free port)")
    return host, int(port)


class DashboardServer:
    """The dashboard on `host:port` (port 0: a free one), started and stopped with the coordinator."""

    def __init__(self, state_dir: Path, store: CertStore, superlink_port: int, host: str, port: int,
                 started_at: float, gateway_stats: GatewayStats | None = None) -> None:
        self.host, self.port = host, port
        self.store = store

        def counts() -> dict[str, int]:
            if gateway_stats is None:
                return {}
            return {"forwarded": gateway_stats.forwarded, "rejected": gateway_stats.rejected}

        def snapshot() -> Snapshot:
            return take_snapshot(state_dir, store, superlink_port, started_at, counts)

        self.app = make_app(snapshot, OperatorPolicy(store))
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}/"

    def start(self, timeout_s: float = 15.0) -> str:
        """Bind (errors surface here, in the caller), serve in a thread; returns the URL."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise RuntimeError(f"the dashboard cannot listen on {self.host}:{self.port} ({exc.strerror})") from exc
        self.port = int(sock.getsockname()[1])
        tls = server_context(self.store.server_cert, self.store.server_key, self.store.ca_cert, self.store.crl)
        factory: Callable[..., object] = lambda *_: tls  # noqa: E731 - uvicorn calls it with (config, default)
        config = uvicorn.Config(
            self.app,
            ssl_context_factory=factory,  # type: ignore[arg-type]
            http=TLSIdentityH11Protocol,
            lifespan="off",
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="dashboard", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the dashboard did not start on {self.host}:{self.port}")
            time.sleep(0.05)
        logger.info("dashboard on %s (operators' certificates only)", self.url)
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        self._server = self._thread = None


def dashboard_factory(address: str) -> Callable[[Coordinator, float], DashboardServer]:
    """What `run_coordinator` calls to build the dashboard on `address` once the gateway runs."""
    host, port = dashboard_address(address)

    def build(coordinator: Coordinator, started_at: float) -> DashboardServer:
        stats = coordinator.gateway.gateway.stats if coordinator.gateway is not None else None
        return DashboardServer(coordinator.state_dir, coordinator.store, coordinator.superlink_port, host, port,
                               started_at, stats)

    return build
