"""The fleet gateway in-process: real mutual TLS in front of a stand-in HTTPS upstream that records what
reaches it (the SuperLink itself is exercised by the integration tests)."""

from __future__ import annotations

import base64
import json
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from certs.keys import load_openssh_public_key
from certs.provision import revoke
from certs.store import CertStore
from certs.tls import client_context, server_context
from server.ops.gateway import FleetGateway, GatewayConfig
from strategies.protocol.processes import free_port


@dataclass
class Upstream:
    """An HTTPS server standing in for the SuperLink: it records requests and answers 200."""

    port: int
    seen: list[dict[str, object]] = field(default_factory=list)


@pytest.fixture
def upstream(store: CertStore) -> Iterator[Upstream]:
    record = Upstream(0)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            record.seen.append({"path": self.path, "headers": dict(self.headers.items()), "body": body})
            payload = b"upstream-ok"
            self.send_response(200)
            self.send_header("content-type", "application/protobuf")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = server_context(store.server_cert, store.server_key).wrap_socket(server.socket, server_side=True)
    record.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield record
    server.shutdown()
    server.server_close()


@pytest.fixture
def gateway(store: CertStore, upstream: Upstream) -> Iterator[FleetGateway]:
    config = GatewayConfig.from_store(store, "127.0.0.1", 0, upstream.port)
    config.max_body_bytes = 1024
    gw = FleetGateway(config)
    gw.policy.revocations.min_interval_s = 0.0
    gw.start()
    yield gw
    gw.close()


def _client(store: CertStore, bundle: Path) -> httpx.Client:
    del store
    return httpx.Client(
        verify=client_context(bundle / "ca.crt", bundle / "client.crt", bundle / "client.key"), timeout=10
    )


def _node_header(store: CertStore, hospital: str) -> dict[str, str]:
    public = load_openssh_public_key(store.hospital(hospital).node_pub)
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return {"flwr-public-key": base64.b64encode(pem).decode(), "content-type": "application/protobuf"}


def _url(gateway: FleetGateway, path: str) -> str:
    return f"https://127.0.0.1:{gateway.port}{path}"


def test_whoami_names_the_site(store: CertStore, gateway: FleetGateway) -> None:
    with _client(store, store.bundle_dir("hospital-a")) as client:
        response = client.get(_url(gateway, "/v1/gateway/whoami"))
    assert response.status_code == 200
    assert response.json()["hospital"] == "hospital-a"


def test_fleet_request_is_forwarded_with_body_and_node_headers(
    store: CertStore, gateway: FleetGateway, upstream: Upstream
) -> None:
    headers = {
        **_node_header(store, "hospital-a"),
        "flwr-signature": "sig",
        "connection": "keep-alive",
        "x-extra": "kept",
    }
    with _client(store, store.bundle_dir("hospital-a")) as client:
        response = client.post(_url(gateway, "/v1/fleet/pull-messages"), content=b"\x01\x02payload", headers=headers)
        again = client.post(_url(gateway, "/v1/fleet/send-node-heartbeat"), content=b"", headers=headers)
    assert response.status_code == 200 and response.content == b"upstream-ok"
    assert again.status_code == 200
    first = upstream.seen[0]
    assert first["path"] == "/v1/fleet/pull-messages" and first["body"] == b"\x01\x02payload"
    raw_headers = first["headers"]
    assert isinstance(raw_headers, dict)
    forwarded = {k.lower(): v for k, v in raw_headers.items()}
    assert forwarded["flwr-signature"] == "sig" and forwarded["x-extra"] == "kept"
    assert forwarded["flwr-public-key"] == headers["flwr-public-key"]
    assert gateway.stats.by_hospital == {"hospital-a": 2}


@pytest.mark.parametrize(
    "path",
    [
        "/v1/control/start-run",
        "/v1/control/list-runs",
        "/v1/runtime/pull-task-input",
        "/v1/fleet/register-node",
        "/v1/fleet/unregister-node",
        "/docs",
        "/v1/fleet/pull-messages/../../control",
    ],
)
def test_routes_other_than_the_fleet_api_are_refused(
    path: str, store: CertStore, gateway: FleetGateway, upstream: Upstream
) -> None:
    with _client(store, store.bundle_dir("hospital-a")) as client:
        response = client.post(_url(gateway, path), content=b"x" * 100, headers=_node_header(store, "hospital-a"))
    assert response.status_code == 403
    assert upstream.seen == []


def test_node_key_must_belong_to_the_certificate(store: CertStore, gateway: FleetGateway, upstream: Upstream) -> None:
    with _client(store, store.bundle_dir("hospital-a")) as client:
        unsigned = client.post(_url(gateway, "/v1/fleet/pull-messages"), content=b"")
        stolen_key = client.post(
            _url(gateway, "/v1/fleet/pull-messages"), content=b"", headers=_node_header(store, "hospital-b")
        )
        wrong_method = client.get(_url(gateway, "/v1/fleet/pull-messages"), headers=_node_header(store, "hospital-a"))
    assert unsigned.status_code == 401
    assert stolen_key.status_code == 401 and "does not belong" in stolen_key.json()["detail"]
    assert wrong_method.status_code == 405
    assert upstream.seen == []


def test_revocation_takes_effect_on_the_next_request(
    store: CertStore, gateway: FleetGateway, upstream: Upstream, tmp_path: Path
) -> None:
    kept = tmp_path / "bundle-a"
    shutil.copytree(store.bundle_dir("hospital-a"), kept)
    with _client(store, kept) as client:
        ok = client.post(_url(gateway, "/v1/fleet/pull-messages"), headers=_node_header(store, "hospital-a"))
        revoke(store.root, "hospital-a")
        refused = client.post(_url(gateway, "/v1/fleet/pull-messages"), headers=_node_header(store, "hospital-a"))
    assert ok.status_code == 200
    assert refused.status_code == 401 and "revoked" in refused.json()["detail"]
    assert len(upstream.seen) == 1


def test_oversized_body_is_refused(store: CertStore, gateway: FleetGateway, upstream: Upstream) -> None:
    with _client(store, store.bundle_dir("hospital-a")) as client:
        response = client.post(
            _url(gateway, "/v1/fleet/push-object"), content=b"x" * 4096, headers=_node_header(store, "hospital-a")
        )
    assert response.status_code == 413
    assert upstream.seen == []


def test_superlink_down_is_a_retryable_503(store: CertStore) -> None:
    config = GatewayConfig.from_store(store, "127.0.0.1", 0, free_port())  # nothing listens upstream
    gw = FleetGateway(config)
    gw.start()
    try:
        with _client(store, store.bundle_dir("hospital-a")) as client:
            response = client.post(
                f"https://127.0.0.1:{gw.port}/v1/fleet/pull-messages", headers=_node_header(store, "hospital-a")
            )
    finally:
        gw.close()
    assert response.status_code == 503
    assert json.loads(response.content)["detail"].endswith("unavailable")
