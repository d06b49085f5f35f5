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

The Fleet transport is protobuf over HTTP/1.1 (httpx in the SuperNode, uvicorn in the SuperLink), so
a small threaded proxy (h11 for parsing, httpx upstream) is enough; no HTTP/2 or gRPC is involved.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

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
    max_body_bytes: int = 1 << 30
    idle_timeout_s: float = 300.0
    upstream_timeout_s: float = 300.0

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


class FleetGateway:
    """A mutual-TLS reverse proxy exposing only the Fleet routes of a loopback SuperLink.

    One thread per connection with blocking sockets: the TLS handshake then sends its alerts, so a
    refused site learns why ("certificate expired", "unknown ca") instead of seeing a closed socket
    (asyncio's TLS layer drops the alert when a handshake fails). SuperNodes keep few connections, so
    `max_connections` threads are plenty; beyond that new connections are closed at once.
    """

    def __init__(self, config: GatewayConfig, max_connections: int = 256) -> None:
        self.config = config
        self.policy = AccessPolicy(RevocationRegister(config.revoked_register))
        self.stats = GatewayStats()
        self.port: int | None = None
        self._tls = server_context(config.server_cert, config.server_key, config.ca_cert, config.crl)
        self._slots = threading.BoundedSemaphore(max_connections)
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
        listener.listen(128)
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
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closing.is_set():
                    return
                continue
            if not self._slots.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(target=self._connection, args=(conn,), name="gateway-conn", daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(30.0)
            # wrap_socket takes over the file descriptor: from here on only `tls` may close it.
            tls = self._tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            try:
                tls.do_handshake()  # blocking: a refusal sends its alert to the peer
            except (ssl.SSLError, OSError) as exc:
                reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or exc
                # A bare connect-and-close (port check, load balancer probe) is not worth a warning.
                level = logging.DEBUG if "EOF" in str(reason) else logging.WARNING
                logger.log(level, "TLS handshake refused: %s", reason)
                _close_gently(tls)
                return
            with tls:
                der = tls.getpeercert(binary_form=True)
                if not der:  # cannot happen with CERT_REQUIRED; refuse rather than assume
                    return
                tls.settimeout(self.config.idle_timeout_s)
                self._serve(tls, PeerIdentity.from_der(der))
        finally:
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
        decision = self.policy.decide(peer, method, target, headers)
        if decision.status == 200:
            body = _json(
                {
                    "hospital": peer.hospital,
                    "serial": peer.serial,
                    "node-key-bound": peer.node_key_fingerprint is not None,
                }
            )
            try:
                self._read_body(conn, tls, headers)
            except _RejectedError:
                return False
            self._reply(conn, tls, 200, body)
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
        status, response_headers, content = self._forward(target, event.headers, body)
        self.stats.forwarded += 1
        self.stats.by_hospital[peer.hospital] = self.stats.by_hospital.get(peer.hospital, 0) + 1
        self._reply(conn, tls, status, content, response_headers)
        return True

    def _read_body(self, conn: h11.Connection, tls: ssl.SSLSocket, headers: dict[str, str]) -> bytes:
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.config.max_body_bytes:
            raise _RejectedError(413, "request body too large")
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                event = self._next_event(conn, tls)
            except h11.RemoteProtocolError as exc:
                raise _RejectedError(400, "malformed HTTP body") from exc
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.config.max_body_bytes:
                    raise _RejectedError(413, "request body too large")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise _RejectedError(400, "connection closed mid-request")

    def _forward(
        self, target: str, raw_headers: Iterable[tuple[bytes, bytes]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in raw_headers
            if k.decode("latin-1").lower() not in HOP_BY_HOP
        ]
        headers.append(("accept-encoding", "identity"))
        try:
            response = self._upstream.post(target, content=body, headers=headers)
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
