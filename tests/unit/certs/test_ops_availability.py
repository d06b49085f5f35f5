"""The gateway under pressure, in-process with real TLS: idle TCP connections cannot crowd out a site,
a handshake has a deadline, request bodies are bounded and spooled to disk."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from certs.store import CertStore
from server.ops.gateway import FleetGateway, GatewayConfig, PendingHandshakes
from tests.unit.certs.test_gateway import Upstream, _client, _node_header, upstream  # noqa: F401  (fixture)


@pytest.fixture
def tight_gateway(store: CertStore, upstream: Upstream) -> Iterator[FleetGateway]:  # noqa: F811
    config = GatewayConfig.from_store(store, "127.0.0.1", 0, upstream.port)
    config.handshake_timeout_s = 1.0
    config.max_pending_per_address = 8
    config.max_pending = 16
    config.max_body_bytes = 64 * 1024
    gw = FleetGateway(config)
    gw.start()
    yield gw
    gw.close()


def _idle_connections(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]


def _closed_by_peer(sock: socket.socket, wait_s: float) -> bool:
    sock.settimeout(wait_s)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_idle_connections_do_not_lock_out_a_site(store: CertStore, tight_gateway: FleetGateway) -> None:
    idle = _idle_connections(tight_gateway.port or 0, 60)  # far beyond every cap
    try:
        with _client(store, store.bundle_dir("hospital-a")) as client:
            answers = [client.get(f"https://127.0.0.1:{tight_gateway.port}/v1/gateway/whoami") for _ in range(5)]
        assert [a.status_code for a in answers] == [200] * 5
        assert len(tight_gateway.pending) <= 8
        assert tight_gateway.pending.dropped >= 60 - 8
    finally:
        for sock in idle:
            sock.close()


def test_a_handshake_that_never_finishes_is_dropped(tight_gateway: FleetGateway) -> None:
    (slow,) = _idle_connections(tight_gateway.port or 0, 1)
    with slow:
        slow.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, then nothing
        assert _closed_by_peer(slow, wait_s=10.0)
    # The reaper closes the socket first; the connection's own thread then sees its handshake fail and
    # counts it, so the count can trail the close by a moment.
    deadline = time.monotonic() + 10.0
    while tight_gateway.stats.handshakes_refused < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tight_gateway.stats.handshakes_refused >= 1


def test_pending_caps_drop_the_oldest_of_the_address() -> None:
    pending = PendingHandshakes(per_address=2, total=3, timeout_s=60)
    pairs = [socket.socketpair() for _ in range(4)]
    try:
        a1, a2, a3, b1 = (p[0] for p in pairs)
        pending.add(a1, "10.0.0.1")  # type: ignore[arg-type]
        pending.add(a2, "10.0.0.1")  # type: ignore[arg-type]
        pending.add(a3, "10.0.0.1")  # type: ignore[arg-type]  # drops a1 (oldest of that address)
        assert pending.dropped == 1 and _closed_by_peer(pairs[0][1], 1.0)
        pending.add(b1, "10.0.0.2")  # type: ignore[arg-type]
        assert len(pending) == 3
        pending.done(b1)  # type: ignore[arg-type]
        assert len(pending) == 2
    finally:
        for left, right in pairs:
            left.close()
            right.close()


def test_bodies_over_the_bound_are_refused_streamed_or_declared(
    store: CertStore, tight_gateway: FleetGateway, upstream: Upstream  # noqa: F811
) -> None:
    url = f"https://127.0.0.1:{tight_gateway.port}/v1/fleet/push-object"
    headers = _node_header(store, "hospital-a")

    def chunks() -> Iterator[bytes]:
        for _ in range(64):
            yield b"x" * 4096  # 256 KiB, no content-length: the gateway must stop reading at the bound

    with _client(store, store.bundle_dir("hospital-a")) as client:
        declared = client.post(url, content=b"x" * (128 * 1024), headers=headers)
        try:
            streamed: httpx.Response | None = client.post(url, content=chunks(), headers=headers)
        except httpx.HTTPError:
            streamed = None  # the gateway may close before the client finished sending: also a refusal
        fits = client.post(url, content=b"y" * (48 * 1024), headers=headers)
    assert declared.status_code == 413 and "larger than" in declared.json()["detail"]
    assert streamed is None or streamed.status_code == 413
    assert fits.status_code == 200
    assert [s["body"] for s in upstream.seen] == [b"y" * (48 * 1024)]


def test_concurrent_bodies_within_the_bound_arrive_whole(
    store: CertStore, upstream: Upstream  # noqa: F811
) -> None:
    config = GatewayConfig.from_store(store, "127.0.0.1", 0, upstream.port)
    config.max_body_bytes = 8 * 1024 * 1024
    gw = FleetGateway(config)
    gw.start()
    results: list[int] = []
    try:
        # (what this costs in memory is measured by bench/bench_gateway_memory.py)
        def send() -> None:
            with _client(store, store.bundle_dir("hospital-a")) as client:
                response = client.post(
                    f"https://127.0.0.1:{gw.port}/v1/fleet/push-object",
                    content=b"z" * (6 * 1024 * 1024),
                    headers=_node_header(store, "hospital-a"),
                )
                results.append(response.status_code)

        threads = [threading.Thread(target=send) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        gw.close()
    assert results == [200, 200, 200]
    assert [len(s["body"]) for s in upstream.seen] == [6 * 1024 * 1024] * 3  # type: ignore[arg-type]
