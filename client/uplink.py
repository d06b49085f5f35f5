"""The site's uplink: the one outbound connection a hospital makes, to the coordinator's gateway.

Flower's SuperNode cannot present a TLS client certificate, so it talks to this local forwarder on
127.0.0.1 (TLS with a throw-away loopback certificate, see certs/loopback.py: the SuperNode refuses
plain HTTP once it authenticates with a node key), and the uplink opens the mutual-TLS connection
to the coordinator with the site's certificate, verifying the coordinator against the federation CA
only (never the system trust store). Each accepted local connection gets its own upstream
connection; when the network drops, the connection closes, the SuperNode's retry logic reconnects,
and so does the uplink. It counts the bytes that leave the site, for the audit log.

Its loopback port forwards with the site's identity, so it serves only the site's own processes:
with `local_peers`, each local connection is traced through /proc to the process that opened it,
and one from any other process (another user's, or a stray program) is closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from certs.bundle import HospitalBundle
from certs.participants import split_address
from certs.tls import client_context
from strategies.protocol.processes import tcp_peer_owner

logger = logging.getLogger(__name__)
WHOAMI_ROUTE = "/v1/gateway/whoami"
# TLS failures that are the network's doing (a connection cut mid-handshake), not a verdict on certificates.
TRANSIENT_TLS = ("UNEXPECTED_EOF", "EOF occurred", "ECONNRESET", "Connection reset")


@dataclass
class UplinkCounters:
    """Bytes and connections through the uplink since it started (no contents, no addresses)."""

    bytes_out: int = 0
    bytes_in: int = 0
    connections: int = 0
    failed_connections: int = 0
    last_error: str = ""
    # Monotonic time the coordinator was last heard from (a connection opened or bytes received).
    last_contact: float = field(default_factory=time.monotonic)
    # Failed connection attempts since the last successful one (0: the coordinator is reachable).
    failures_in_a_row: int = 0
    # Local connections refused because they did not come from this site's own processes.
    refused_local: int = 0

    def offline_s(self, now: float | None = None) -> float:
        """Seconds since the coordinator was last heard from."""
        return (time.monotonic() if now is None else now) - self.last_contact


def bundle_tls_context(bundle: HospitalBundle) -> ssl.SSLContext:
    """Trust only the federation CA; present the site's client certificate."""
    return client_context(bundle.ca_cert, bundle.client_cert, bundle.client_key)


@dataclass(frozen=True)
class ProbeResult:
    """What the coordinator's gateway said about this site's credentials."""

    ok: bool
    message: str
    hospital: str | None = None
    # True when the coordinator (or this site) rejects the credentials; False when it was unreachable.
    refused: bool = False


def probe_coordinator(
    bundle: HospitalBundle, address: str | None = None, timeout_s: float = 10.0
) -> ProbeResult:
    """Open a mutual-TLS connection to the gateway and ask who it thinks we are.

    Fails with a one-line reason when the coordinator is unreachable, its certificate is not from the
    federation CA or lacks the address's name, or it refuses this site's certificate.
    """
    address = address or bundle.coordinator_address
    host, port = split_address(address, "coordinator-address")
    url = f"https://{host if ':' not in host else f'[{host}]'}:{port}{WHOAMI_ROUTE}"
    try:
        context = bundle_tls_context(bundle)
    except (OSError, ssl.SSLError) as exc:
        return ProbeResult(False, f"this site's bundle cannot be used: {exc}", refused=True)
    try:
        with httpx.Client(verify=context, timeout=timeout_s) as client:
            response = client.get(url)
    except httpx.HTTPError as exc:
        reason = _tls_reason(exc)
        refused = reason.startswith("TLS") and not any(mark in reason for mark in TRANSIENT_TLS)
        return ProbeResult(False, f"cannot use the coordinator at {address}: {reason}", refused=refused)
    if response.status_code != 200:
        try:
            detail = str(response.json().get("detail", response.text))
        except ValueError:
            detail = response.text[:200]
        verdict = "cannot accept sites now" if response.status_code == 503 else "refused this site"
        return ProbeResult(
            False,
            f"coordinator {verdict} ({response.status_code}): {detail}",
            refused=response.status_code in (401, 403),
        )
    seen = response.json().get("hospital")
    if seen != bundle.hospital:
        return ProbeResult(
            False,
            f"coordinator sees this certificate as {seen!r}, not {bundle.hospital!r}",
            seen,
            refused=True,
        )
    return ProbeResult(True, f"coordinator at {address} accepts this site as {seen!r}", seen)


# TLS alerts the gateway sends when it refuses this site's certificate, in words.
TLS_ALERTS = {
    "CERTIFICATE_REVOKED": "the coordinator says this site's certificate is revoked",
    "CERTIFICATE_EXPIRED": "the coordinator says this site's certificate has expired (check both clocks)",
    "UNKNOWN_CA": "the coordinator does not know the CA of this site's certificate",
    "BAD_CERTIFICATE": "the coordinator refused this site's certificate",
    "CERTIFICATE_REQUIRED": "the coordinator requires a client certificate",
}


def _tls_reason(exc: BaseException) -> str:
    """The most specific reason in an exception chain (an SSL error names the certificate problem)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            reason = str(seen.reason or seen)
            plain = next((words for alert, words in TLS_ALERTS.items() if reason.endswith("ALERT_" + alert)), None)
            return f"TLS: {reason}" + (f" ({plain})" if plain else "")
        seen = seen.__cause__ or seen.__context__
    return str(exc) or type(exc).__name__


class Uplink:
    """Forward local plain connections to the coordinator over mutual TLS (asyncio)."""

    def __init__(
        self,
        bundle: HospitalBundle,
        local_tls: ssl.SSLContext | None,
        address: str | None = None,
        listen_port: int = 0,
        connect_timeout_s: float = 15.0,
        local_peers: Callable[[], Iterable[int]] | None = None,
    ) -> None:
        self.bundle = bundle
        self.address = address or bundle.coordinator_address
        self.host, self.port = split_address(self.address, "coordinator-address")
        self.listen_port = listen_port
        self.connect_timeout_s = connect_timeout_s
        self.counters = UplinkCounters()
        self._tls = bundle_tls_context(bundle)
        self._local_tls = local_tls
        self._server: asyncio.Server | None = None
        # The pids allowed to use the uplink (None: anyone on loopback, for tests of the forwarding alone).
        self.local_peers = local_peers

    async def start(self) -> int:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.listen_port, ssl=self._local_tls
        )
        self.listen_port = int(self._server.sockets[0].getsockname()[1])
        return self.listen_port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    def _from_own_process(self, writer: asyncio.StreamWriter) -> bool:
        if self.local_peers is None:
            return True
        peer = writer.get_extra_info("peername")
        if not peer:
            return False
        return tcp_peer_owner((str(peer[0]), int(peer[1])), self.listen_port, list(self.local_peers())) is not None

    async def _handle(self, local_reader: asyncio.StreamReader, local_writer: asyncio.StreamWriter) -> None:
        if not self._from_own_process(local_writer):
            self.counters.refused_local += 1
            level = logging.WARNING if self.counters.refused_local <= 3 else logging.DEBUG
            logger.log(level, "uplink: refused a local connection from a process that is not this site's own")
            local_writer.close()
            return
        try:
            remote_reader, remote_writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, ssl=self._tls, server_hostname=self.host),
                self.connect_timeout_s,
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self._connection_failed(exc)
            local_writer.close()
            return
        self._connection_opened()
        await asyncio.gather(
            self._pipe(local_reader, remote_writer, outbound=True),
            self._pipe(remote_reader, local_writer, outbound=False),
        )

    def _connection_failed(self, exc: BaseException) -> None:
        counters = self.counters
        counters.failed_connections += 1
        counters.failures_in_a_row += 1
        counters.last_error = _tls_reason(exc)
        # The SuperNode retries every few seconds during an outage: say it once, not at every attempt.
        level = logging.WARNING if counters.failures_in_a_row == 1 else logging.DEBUG
        logger.log(level, "uplink: cannot reach the coordinator (%s); retrying", counters.last_error)

    def _connection_opened(self) -> None:
        counters = self.counters
        if counters.failures_in_a_row:
            logger.info(
                "uplink: the coordinator is reachable again (after %d failed connection attempts, %.0fs)",
                counters.failures_in_a_row,
                counters.offline_s(),
            )
        counters.failures_in_a_row = 0
        counters.connections += 1
        counters.last_contact = time.monotonic()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, outbound: bool) -> None:
        try:
            while data := await reader.read(256 * 1024):
                writer.write(data)
                await writer.drain()
                if outbound:
                    self.counters.bytes_out += len(data)
                else:
                    self.counters.bytes_in += len(data)
                    self.counters.last_contact = time.monotonic()
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            # One side ended: end both, so the SuperNode sees the break and reconnects.
            with contextlib.suppress(Exception):
                writer.close()
            reader.feed_eof()


class UplinkThread:
    """Run an Uplink on its own event loop in a daemon thread; writes its counters to a file."""

    def __init__(self, uplink: Uplink, counters_file: Path | None = None) -> None:
        self.uplink = uplink
        self.counters_file = counters_file
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="uplink", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.uplink.start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        if self.counters_file is not None:
            self._loop.create_task(self._write_counters_every(5.0))
        self._loop.run_forever()
        self._loop.run_until_complete(self.uplink.close())
        self.write_counters()
        self._loop.close()

    async def _write_counters_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            self.write_counters()

    def write_counters(self) -> None:
        if self.counters_file is None:
            return
        c = self.uplink.counters
        tmp = self.counters_file.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "bytes_out": c.bytes_out,
                    "bytes_in": c.bytes_in,
                    "connections": c.connections,
                    "failed_connections": c.failed_connections,
                }
            )
        )
        tmp.replace(self.counters_file)

    def start(self, timeout: float = 10.0) -> int:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("uplink did not start")
        if self._error is not None:
            raise self._error
        return self.uplink.listen_port

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5.0)
