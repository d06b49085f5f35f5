"""The fleet gateway: the only door of the coordinator that hospitals can reach.

Flower 1.42 serves its Fleet API (nodes), Control API (`flwr run`, `flwr stop`, node registration) and
Runtime API (ServerApp) on one HTTP port, and in open-source Flower the Control API has no
authentication. So the SuperLink listens on loopback only, and this gateway faces the hospitals:

* mutual TLS: a hospital must present a client certificate signed by the federation CA, in date,
  not revoked (CRL at the handshake, and the live revocation register on every request);
* only the Fleet routes a SuperNode needs are forwarded (POST, exact paths); the Control and
  Runtime APIs, node self-registration and everything else get 403 and the connection is closed;
* the node key a request is signed with (Flower's `flwr-public-key` header) must be the one the
  hospital's certificate is bound to, so a stolen node key is useless without that site's certificate.

It is also the coordinator's first line against a site (or anyone) trying to wear it down:

* certificates, key, CA and CRL are re-read when their files change (a `certs renew`, `issue` or
  `revoke` takes effect without a restart); an expired CRL is not handed to OpenSSL (which would
  refuse every site with a misleading "certificate expired"): every request is answered 503 naming
  the expired CRL instead, until the coordinator (or its operator) refreshes it;
* a TLS handshake must finish within `handshake_timeout_s`; connections still in their handshake are
  capped per address and in total, the oldest dropped first, so idle TCP connections cannot crowd out
  a site whose handshake takes milliseconds;
* request bodies are bounded (`max_body_bytes`: Flower sends arrays in chunks of at most 5 MiB) and
  spooled to disk beyond a small buffer, so concurrent oversized uploads cost neither memory nor
  more than the bound each.

The Fleet transport is protobuf over HTTP/1.1 (httpx in the SuperNode, uvicorn in the SuperLink), so
a small threaded proxy (h11 for parsing, httpx upstream) is enough; no HTTP/2 or gRPC is involved.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import json
import logging
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import h11
import httpx
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from certs.authority import common_name, node_key_fingerprint_of
from certs.keys import public_key_fingerprint
from certs.store import CertStore
from certs.tls import client_context, server_context

logger = logging.getLogger(__name__)

# What a SuperNode calls (flwr/supernode/fleet_http_client.py), minus self-registration: node keys are
# registered by the coordinator only.
FLEET_ROUTES = frozenset(
    f"/v1/fleet/{name}"
    for name in (
        "activate-node",
        "deactivate-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)
WHOAMI_ROUTE = "/v1/gateway/whoami"
NODE_KEY_HEADER = "flwr-public-key"
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "accept-encoding",
        "content-encoding",
    }
)
MAX_HEAD_BYTES = 64 * 1024
DISCARD_LIMIT_BYTES = 16 * 1024 * 1024
# Flower splits arrays into chunks of at most 5 MiB (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE), one object per
# push-object request: no request of a well-behaved SuperNode comes near this bound.
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
# Bodies are kept in memory up to this size, spooled to a temporary file beyond it.
SPOOL_IN_MEMORY_BYTES = 1024 * 1024


@dataclass(frozen=True)
class PeerIdentity:
    """Who opened a TLS connection, read from the verified client certificate."""

    hospital: str
    serial: str
    node_key_fingerprint: str | None

    @classmethod
    def from_der(cls, der: bytes) -> PeerIdentity:
        cert = x509.load_der_x509_certificate(der)
        return cls(common_name(cert), format(cert.serial_number, "x"), node_key_fingerprint_of(cert))


@dataclass(frozen=True)
class Decision:
    """`status` 0 means forward; otherwise answer with this status and reason, then close."""

    status: int
    reason: str = ""

    @property
    def forward(self) -> bool:
        return self.status == 0


class RevocationRegister:
    """The coordinator's revoked certificates and node keys, re-read whenever the file changes."""

    def __init__(self, path: Path | None, min_interval_s: float = 0.5) -> None:
        self.path = path
        self.min_interval_s = min_interval_s
        self._mtime: float | None = None
        self._checked = 0.0
        self.serials: frozenset[str] = frozenset()
        self.node_keys: frozenset[str] = frozenset()
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.path is None or (not force and now - self._checked < self.min_interval_s):
            return
        self._checked = now
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self.serials, self.node_keys, self._mtime = frozenset(), frozenset(), None
            return
        if mtime == self._mtime and not force:
            return
        try:
            records = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            logger.error("revocation register %s unreadable; keeping the previous one", self.path)
            return
        self._mtime = mtime
        self.serials = frozenset(s for r in records.values() for s in r.get("serials", []))
        self.node_keys = frozenset(k for r in records.values() for k in r.get("node_key_fingerprints", []))


def node_key_fingerprint_from_header(value: str) -> str | None:
    """Fingerprint of the node key in Flower's `flwr-public-key` header (base64 of a PEM key)."""
    try:
        key = load_pem_public_key(base64.b64decode(value, validate=True))
    except (ValueError, TypeError, binascii.Error):
        return None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return None
    return public_key_fingerprint(key)


class AccessPolicy:
    """Decide, from the request head alone, whether a request may reach the SuperLink."""

    def __init__(self, revocations: RevocationRegister) -> None:
        self.revocations = revocations

    def decide(self, peer: PeerIdentity, method: str, target: str, headers: dict[str, str]) -> Decision:
        self.revocations.refresh()
        if peer.serial in self.revocations.serials:
            return Decision(401, "this site's certificate is revoked")
        if target == WHOAMI_ROUTE and method == "GET":
            return Decision(200, "whoami")
        if target not in FLEET_ROUTES:
            return Decision(403, "route not exposed to hospitals")
        if method != "POST":
            return Decision(405, "method not allowed")
        header = headers.get(NODE_KEY_HEADER)
        fingerprint = node_key_fingerprint_from_header(header) if header else None
        if fingerprint is None:
            return Decision(401, "request not signed with a node key")
        if fingerprint in self.revocations.node_keys:
            return Decision(401, "this site's node key is revoked")
        if peer.node_key_fingerprint != fingerprint:
            return Decision(401, "node key does not belong to this site's certificate")
        return Decision(0)


@dataclass
class GatewayConfig:
    """Where the gateway listens, where the SuperLink is, and the files it trusts."""

    listen_host: str
    listen_port: int
    upstream_port: int
    server_cert: Path
    server_key: Path
    ca_cert: Path
    crl: Path | None = None
    revoked_register: Path | None = None
    upstream_host: str = "127.0.0.1"
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    idle_timeout_s: float = 300.0
    upstream_timeout_s: float = 300.0
    # The whole TLS handshake must finish within this time (a slow sender cannot stretch it).
    handshake_timeout_s: float = 5.0
    # Connections still in their handshake: per client address and in total (oldest dropped first).
    max_pending_per_address: int = 32
    max_pending: int = 128
    # Authenticated connections: in total and per hospital certificate.
    max_connections: int = 256
    max_connections_per_hospital: int = 64
    # How often certificate, key, CA and CRL files are checked for changes.
    reload_check_s: float = 1.0

    @classmethod
    def from_store(
        cls, store: CertStore, listen_host: str, listen_port: int, upstream_port: int
    ) -> GatewayConfig:
        return cls(
            listen_host=listen_host,
            listen_port=listen_port,
            upstream_port=upstream_port,
            server_cert=store.server_cert,
            server_key=store.server_key,
            ca_cert=store.ca_cert,
            crl=store.crl,
            revoked_register=store.revoked_register,
        )


class TLSMaterial:
    """The gateway's TLS server context, rebuilt whenever its certificate, key, CA or CRL file changes.

    An expired (or unreadable) CRL is left out of the context, and `crl_problem` says why: the
    gateway then refuses every request with that reason instead of letting OpenSSL fail handshakes
    with an alert the sites would read as "certificate expired"."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.crl_problem: str | None = None
        self.crl_next_update: dt.datetime | None = None
        self.reloads = 0
        self._lock = threading.Lock()
        self._checked = 0.0
        self._stamp = self._file_stamp()
        self._context = self._build()

    def _files(self) -> list[Path]:
        files = [self.config.server_cert, self.config.server_key, self.config.ca_cert]
        return files + ([self.config.crl] if self.config.crl is not None else [])

    def _file_stamp(self) -> tuple[tuple[int, int], ...]:
        stamp = []
        for path in self._files():
            try:
                info = path.stat()
                stamp.append((info.st_mtime_ns, info.st_size))
            except OSError:
                stamp.append((0, 0))
        return tuple(stamp)

    def _usable_crl(self) -> Path | None:
        crl_path = self.config.crl
        self.crl_problem = None
        self.crl_next_update = None
        if crl_path is None or not crl_path.exists():
            return None
        try:
            crl = x509.load_pem_x509_crl(crl_path.read_bytes())
        except (OSError, ValueError):
            self.crl_problem = f"the coordinator's certificate revocation list ({crl_display(crl_path)}) is unreadable"
            return None
        self.crl_next_update = crl.next_update_utc
        if crl.next_update_utc is not None and crl.next_update_utc <= dt.datetime.now(dt.timezone.utc):
            self.crl_problem = (
                f"the coordinator's certificate revocation list ({crl_display(crl_path)}) expired on "
                f"{crl.next_update_utc:%Y-%m-%d %H:%M} UTC; the coordinator must refresh it "
                "(`visionfm-server certs refresh-crl`)"
            )
            return None
        return crl_path

    def _build(self) -> ssl.SSLContext:
        crl = self._usable_crl()
        return server_context(self.config.server_cert, self.config.server_key, self.config.ca_cert, crl)

    def context(self) -> ssl.SSLContext:
        """The current context, rebuilt first when a file changed or the CRL has just expired."""
        now = time.monotonic()
        if now - self._checked < self.config.reload_check_s:
            return self._context
        with self._lock:
            self._checked = now
            stamp = self._file_stamp()
            expired_now = (
                self.crl_problem is None
                and self.crl_next_update is not None
                and self.crl_next_update <= dt.datetime.now(dt.timezone.utc)
            )
            if stamp != self._stamp or expired_now:
                try:
                    context = self._build()
                except (OSError, ssl.SSLError) as exc:  # a half-written file: keep serving, retry later
                    logger.error("could not reload the gateway's certificates (%s); keeping the previous ones", exc)
                    return self._context
                self._stamp = stamp
                self._context = context
                self.reloads += 1
                logger.info("gateway certificates reloaded%s", f" ({self.crl_problem})" if self.crl_problem else "")
            return self._context


def crl_display(path: Path) -> str:
    """A CRL's path as operators know it (relative to the provisioning folder: ca/crl.pem)."""
    return f"{path.parent.name}/{path.name}"


class PendingHandshakes:
    """Connections that have not finished their TLS handshake: deadlines, per-address and total caps.

    When a cap is reached the oldest pending connection (of that address, or overall) is dropped:
    a real site finishes its handshake within milliseconds, so it is never the oldest for long,
    while idle or slow connections are pushed out."""

    def __init__(self, per_address: int, total: int, timeout_s: float) -> None:
        self.per_address = per_address
        self.total = total
        self.timeout_s = timeout_s
        self.dropped = 0
        self._lock = threading.Lock()
        self._pending: dict[ssl.SSLSocket, tuple[str, float]] = {}

    def add(self, conn: ssl.SSLSocket, address: str) -> None:
        with self._lock:
            same = [(t, c) for c, (a, t) in self._pending.items() if a == address]
            if len(same) >= self.per_address:
                self._drop(min(same, key=lambda item: item[0])[1])
            if len(self._pending) >= self.total:
                self._drop(min(self._pending, key=lambda c: self._pending[c][1]))
            self._pending[conn] = (address, time.monotonic())

    def done(self, conn: ssl.SSLSocket) -> None:
        with self._lock:
            self._pending.pop(conn, None)

    def expire(self) -> None:
        """Drop the connections whose handshake has taken longer than the timeout."""
        deadline = time.monotonic() - self.timeout_s
        with self._lock:
            for conn in [c for c, (_, t) in self._pending.items() if t < deadline]:
                self._drop(conn)

    def __len__(self) -> int:
        return len(self._pending)

    def _drop(self, conn: ssl.SSLSocket) -> None:
        self._pending.pop(conn, None)
        self.dropped += 1
        # The plain socket's shutdown (not the TLS one) wakes the thread blocked in its handshake.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(conn, socket.SHUT_RDWR)


class _RejectedError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class GatewayStats:
    """Counters for status displays (no payloads, no hospital data)."""

    forwarded: int = 0
    rejected: int = 0
    by_hospital: dict[str, int] = field(default_factory=dict)
    handshakes_refused: int = 0
    connections_refused: int = 0


class FleetGateway:
    """A mutual-TLS reverse proxy exposing only the Fleet routes of a loopback SuperLink.

    One thread per connection with blocking sockets: the TLS handshake then sends its alerts, so a
    refused site learns why ("certificate expired", "unknown ca") instead of seeing a closed socket
    (asyncio's TLS layer drops the alert when a handshake fails). Handshakes in progress are bounded
    by `PendingHandshakes`; SuperNodes keep few connections, so `max_connections` authenticated
    connections are plenty; beyond that (or a hospital's share) new connections are closed.
    """

    def __init__(self, config: GatewayConfig, max_connections: int | None = None) -> None:
        self.config = config
        self.policy = AccessPolicy(RevocationRegister(config.revoked_register))
        self.stats = GatewayStats()
        self.port: int | None = None
        self.tls = TLSMaterial(config)
        self.pending = PendingHandshakes(
            config.max_pending_per_address, config.max_pending, config.handshake_timeout_s
        )
        max_connections = max_connections or config.max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._per_hospital: dict[str, int] = {}
        self._count_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._upstream = httpx.Client(
            base_url=f"https://{config.upstream_host}:{config.upstream_port}",
            verify=client_context(config.ca_cert),
            timeout=config.upstream_timeout_s,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=32),
        )

    def start(self) -> int:
        """Listen and serve in background threads; returns the bound port (useful with port 0)."""
        family = socket.AF_INET6 if ":" in self.config.listen_host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.config.listen_host, self.config.listen_port))
        listener.listen(1024)
        listener.settimeout(0.2)  # lets the accept loop notice `close`
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._accept_thread = threading.Thread(target=self._accept_loop, name="gateway-accept", daemon=True)
        self._accept_thread.start()
        logger.info(
            "fleet gateway listening on %s:%d (SuperLink at loopback:%d)",
            self.config.listen_host,
            self.port,
            self.config.upstream_port,
        )
        return self.port

    def close(self) -> None:
        self._closing.set()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5.0)
        if self._listener is not None:
            self._listener.close()
        self._upstream.close()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            self.pending.expire()
            try:
                conn, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closing.is_set():
                    return
                continue
            try:
                conn.settimeout(self.config.handshake_timeout_s)
                # wrap_socket takes over the file descriptor: from here on only `tls` may close it.
                tls = self.tls.context().wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            except (OSError, ssl.SSLError):
                conn.close()
                continue
            self.pending.add(tls, str(address[0]))
            threading.Thread(target=self._connection, args=(tls,), name="gateway-conn", daemon=True).start()

    def _connection(self, tls: ssl.SSLSocket) -> None:
        try:
            tls.do_handshake()  # blocking: a refusal sends its alert to the peer
        except (ssl.SSLError, OSError, ValueError) as exc:
            self.pending.done(tls)
            self.stats.handshakes_refused += 1
            reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or exc
            # A bare connect-and-close (port check, probe) or a dropped idle connection is not worth a warning.
            quiet = "EOF" in str(reason) or not isinstance(exc, ssl.SSLError)
            logger.log(logging.DEBUG if quiet else logging.WARNING, "TLS handshake refused: %s", reason)
            _close_gently(tls)
            return
        self.pending.done(tls)
        with tls:
            der = tls.getpeercert(binary_form=True)
            if not der:  # cannot happen with CERT_REQUIRED; refuse rather than assume
                return
            peer = PeerIdentity.from_der(der)
            if not self._take_slot(peer):
                self.stats.connections_refused += 1
                logger.warning("too many connections from %s; refusing one", peer.hospital)
                return
            try:
                tls.settimeout(self.config.idle_timeout_s)
                self._serve(tls, peer)
            finally:
                self._free_slot(peer)

    def _take_slot(self, peer: PeerIdentity) -> bool:
        with self._count_lock:
            if self._per_hospital.get(peer.serial, 0) >= self.config.max_connections_per_hospital:
                return False
            if not self._slots.acquire(blocking=False):
                return False
            self._per_hospital[peer.serial] = self._per_hospital.get(peer.serial, 0) + 1
            return True

    def _free_slot(self, peer: PeerIdentity) -> None:
        with self._count_lock:
            left = self._per_hospital.get(peer.serial, 1) - 1
            if left:
                self._per_hospital[peer.serial] = left
            else:
                self._per_hospital.pop(peer.serial, None)
            self._slots.release()

    def _serve(self, tls: ssl.SSLSocket, peer: PeerIdentity) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        try:
            while not self._closing.is_set():
                if not self._serve_one(conn, tls, peer):
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (OSError, ssl.SSLError, h11.LocalProtocolError):
            return

    def _next_event(self, conn: h11.Connection, tls: ssl.SSLSocket) -> object:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(tls.recv(65536))

    def _serve_one(self, conn: h11.Connection, tls: ssl.SSLSocket, peer: PeerIdentity) -> bool:
        """Serve one request; False when the connection must close afterwards."""
        try:
            event = self._next_event(conn, tls)
        except h11.RemoteProtocolError:
            self._reply_error(conn, tls, 400, "malformed HTTP request")
            return False
        if not isinstance(event, h11.Request):
            return False
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("ascii", "replace")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
        self.tls.context()  # notices an expired or replaced CRL on long-lived connections too
        crl_problem = self.tls.crl_problem
        decision = Decision(503, crl_problem) if crl_problem else self.policy.decide(peer, method, target, headers)
        if decision.status == 200:
            answer = _json(
                {
                    "hospital": peer.hospital,
                    "serial": peer.serial,
                    "node-key-bound": peer.node_key_fingerprint is not None,
                }
            )
            try:
                self._read_body(conn, tls, headers).close()
            except _RejectedError:
                return False
            self._reply(conn, tls, 200, answer)
            return True
        if not decision.forward:
            self.stats.rejected += 1
            logger.warning("refused %s %s from %s: %s", method, target, peer.hospital, decision.reason)
            self._reply_error(conn, tls, decision.status, decision.reason)
            return False
        try:
            body = self._read_body(conn, tls, headers)
        except _RejectedError as exc:
            self.stats.rejected += 1
            self._reply_error(conn, tls, exc.status, exc.reason)
            return False
        with body:
            status, response_headers, content = self._forward(target, event.headers, body)
        self.stats.forwarded += 1
        self.stats.by_hospital[peer.hospital] = self.stats.by_hospital.get(peer.hospital, 0) + 1
        self._reply(conn, tls, status, content, response_headers)
        return True

    def _read_body(self, conn: h11.Connection, tls: ssl.SSLSocket, headers: dict[str, str]) -> _Body:
        """The request body, at most `max_body_bytes`, in memory up to a small size and on disk beyond."""
        limit = self.config.max_body_bytes
        too_large = f"request body larger than {limit // (1024 * 1024)} MiB"
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _RejectedError(413, too_large)
        body = _Body()
        try:
            while True:
                try:
                    event = self._next_event(conn, tls)
                except h11.RemoteProtocolError as exc:
                    raise _RejectedError(400, "malformed HTTP body") from exc
                if isinstance(event, h11.Data):
                    if body.size + len(event.data) > limit:
                        raise _RejectedError(413, too_large)
                    body.write(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    return body
                else:
                    raise _RejectedError(400, "connection closed mid-request")
        except BaseException:
            body.close()
            raise

    def _forward(
        self, target: str, raw_headers: Iterable[tuple[bytes, bytes]], body: _Body
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in raw_headers
            if k.decode("latin-1").lower() not in HOP_BY_HOP
        ]
        headers.append(("accept-encoding", "identity"))
        headers.append(("content-length", str(body.size)))
        try:
            response = self._upstream.post(target, content=body.chunks(), headers=headers)
        except httpx.HTTPError as exc:
            logger.warning("SuperLink unreachable for %s: %s", target, type(exc).__name__)
            return (
                503,
                [("content-type", "application/json")],
                _error_body(503, "coordinator's SuperLink unavailable"),
            )
        out = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in HOP_BY_HOP]
        return response.status_code, out, response.content

    def _reply(
        self,
        conn: h11.Connection,
        tls: ssl.SSLSocket,
        status: int,
        content: bytes,
        headers: list[tuple[str, str]] | None = None,
        close: bool = False,
    ) -> None:
        header_list = list(headers or [("content-type", "application/json")])
        header_list.append(("content-length", str(len(content))))
        if close:
            header_list.append(("connection", "close"))
        data = conn.send(h11.Response(status_code=status, headers=header_list)) or b""
        data += conn.send(h11.Data(data=content)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        tls.sendall(data)

    def _reply_error(self, conn: h11.Connection, tls: ssl.SSLSocket, status: int, reason: str) -> None:
        """Answer and prepare to close. The rest of the request is read and dropped first (bounded), because
        closing with unread data makes TCP send a reset that can destroy the answer in flight."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        with contextlib.suppress(h11.LocalProtocolError, OSError, ssl.SSLError):
            self._reply(conn, tls, status, _error_body(status, reason), close=True)
        with contextlib.suppress(OSError, ssl.SSLError):
            tls.settimeout(0.5)
            budget = DISCARD_LIMIT_BYTES
            while budget > 0 and (chunk := tls.recv(65536)):
                budget -= len(chunk)


class _Body:
    """A request body being received: in memory up to SPOOL_IN_MEMORY_BYTES, then in a temporary file
    (deleted on close), so large bodies never sit in the coordinator's memory."""

    def __init__(self) -> None:
        self.size = 0
        self._file: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES)  # noqa: SIM115

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._file.write(data)
        self.size += len(data)

    def chunks(self, size: int = 256 * 1024) -> Iterator[bytes]:
        self._file.seek(0)
        while chunk := self._file.read(size):
            yield chunk

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> _Body:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _close_gently(conn: socket.socket, drain_s: float = 1.0) -> None:
    """Close after a refused handshake without a TCP reset: with TLS 1.3 the client may already be
    sending its first request, and a reset would discard the alert that tells it why it was refused.
    (On an SSLSocket, `shutdown` drops the TLS layer and shuts the TCP connection's sending side.)"""
    with contextlib.suppress(OSError, ValueError):
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(drain_s)
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline and conn.recv(65536):
            pass
    conn.close()


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


def _error_body(status: int, reason: str) -> bytes:
    # The shape of Flower's HTTP errors ({"code", "detail"}), so a SuperNode prints the reason.
    return _json({"code": status, "detail": f"visionfm gateway: {reason}"})


class GatewayThread:
    """Start/stop wrapper kept for callers: the gateway runs in its own background threads."""

    def __init__(self, config: GatewayConfig) -> None:
        self.gateway = FleetGateway(config)
        self.port: int | None = None

    def start(self, timeout: float = 10.0) -> int:
        del timeout  # binding is synchronous
        self.port = self.gateway.start()
        return self.port

    def stop(self) -> None:
        self.gateway.close()
