"""Who cannot join: real TLS handshakes against the running gateway, real SuperNodes, real `join`.

The tests share one coordinator; none of them lets hospital-a in, and only the last one (revocation)
changes the federation, for hospital-b, which no other test uses."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from certs.tls import client_context
from strategies.protocol.processes import flower_env, flower_script
from tests.integration.deployment.conftest import (
    CoordinatorHandle,
    Federation,
    Processes,
    join_site,
    online_nodes,
    site_data,
    wait_until,
)
from tests.integration.deployment.forge import expired, forge_bundle

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def _whoami(federation: Federation, context: ssl.SSLContext) -> str:
    """Send one request to the gateway; return the status line, or the TLS error that ended it."""
    try:
        with (
            socket.create_connection(("127.0.0.1", federation.gateway_port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"GET /v1/gateway/whoami HTTP/1.1\r\nHost: gateway\r\nContent-Length: 0\r\n\r\n")
            reply = tls.recv(4096)
    except (ssl.SSLError, ConnectionError) as exc:
        return f"TLS error: {exc}"
    if not reply:  # TLS 1.3: the server's alert may arrive as a closed connection
        return "TLS error: connection closed by the gateway"
    return reply.split(b"\r\n", 1)[0].decode()


def test_gateway_tls_refuses_missing_foreign_and_expired_certificates(
    shared_coordinator: CoordinatorHandle, shared_federation: Federation, tmp_path: Path
) -> None:
    store = shared_federation.store
    valid = shared_federation.bundle("hospital-a")
    # Positive control: the hospital's own bundle is accepted and recognised.
    ok = client_context(valid / "ca.crt", valid / "client.crt", valid / "client.key")
    assert _whoami(shared_federation, ok).startswith("HTTP/1.1 200")

    no_cert = client_context(store.ca_cert)
    assert _whoami(shared_federation, no_cert).startswith("TLS error")

    foreign = forge_bundle(store, tmp_path / "foreign", "hospital-a", foreign_ca=True, reuse_node_key_of="hospital-a")
    foreign_cert_trusting_us = client_context(store.ca_cert, foreign.client_cert, foreign.client_key)
    assert "UNKNOWN_CA" in _whoami(shared_federation, foreign_cert_trusting_us).upper().replace(" ", "_")

    old = forge_bundle(store, tmp_path / "expired", "hospital-a", validity=expired(), reuse_node_key_of="hospital-a")
    expired_cert = client_context(store.ca_cert, old.client_cert, old.client_key)
    assert "EXPIRED" in _whoami(shared_federation, expired_cert).upper()

    # A client that trusts the system store instead of the federation CA refuses the gateway itself.
    system_trust = ssl.create_default_context()
    system_trust.load_cert_chain(valid / "client.crt", valid / "client.key")
    assert "CERTIFICATE_VERIFY_FAILED" in _whoami(shared_federation, system_trust).upper()


def _run_raw_supernode(federation: Federation, tmp_path: Path, name: str, *tls_args: str) -> tuple[int, str]:
    """Stock `flower-supernode` pointed straight at the gateway, as an outsider would try."""
    bundle = federation.bundle("hospital-a")
    home = tmp_path / name
    command = [
        flower_script("flower-supernode"),
        "--superlink",
        federation.address,
        *tls_args,
        "--auth-supernode-private-key",
        str(bundle / "node.key"),
        "--port",
        "0",
        "--max-wait-time",
        "10",
    ]
    result = subprocess.run(command, env=flower_env(home), capture_output=True, text=True, timeout=120, check=False)
    return result.returncode, result.stdout + result.stderr


def test_stock_supernode_without_the_ca_or_without_a_certificate_is_refused(
    shared_coordinator: CoordinatorHandle, shared_federation: Federation, tmp_path: Path
) -> None:
    code, log = _run_raw_supernode(shared_federation, tmp_path, "no-ca")
    assert code != 0
    assert "CERTIFICATE_VERIFY_FAILED" in log.upper() or "SSL" in log.upper()
    # With the CA it can check the gateway, but it cannot present a client certificate: refused.
    code, log = _run_raw_supernode(
        shared_federation, tmp_path, "no-cert", "--root-certificates", str(shared_federation.store.ca_cert)
    )
    assert code != 0
    assert "hospital-a" not in online_nodes(shared_coordinator)


@pytest.mark.parametrize("kind", ["foreign-ca", "expired"])
def test_join_with_a_bad_bundle_fails_with_the_reason(
    kind: str,
    shared_coordinator: CoordinatorHandle,
    shared_federation: Federation,
    processes: Processes,
    tmp_path: Path,
) -> None:
    store = shared_federation.store
    if kind == "foreign-ca":
        bundle = forge_bundle(store, tmp_path / kind, "hospital-a", foreign_ca=True, reuse_node_key_of="hospital-a")
        expected = "CERTIFICATE_VERIFY_FAILED"
    else:
        bundle = forge_bundle(store, tmp_path / kind, "hospital-a", validity=expired(), reuse_node_key_of="hospital-a")
        expected = "EXPIRED"
    data = site_data(tmp_path / "data", count=1)[0]
    site = join_site(processes, bundle.root, data, tmp_path / "site")
    code = site.wait(timeout=90)
    output = (tmp_path / "site.out").read_text()
    assert code == 1, output
    assert expected in output.upper().replace(" ", "_")
    assert "hospital-a" not in online_nodes(shared_coordinator)


def test_unregistered_node_key_is_refused(
    shared_coordinator: CoordinatorHandle, shared_federation: Federation, processes: Processes, tmp_path: Path
) -> None:
    # A certificate from the federation CA, but for a node key the coordinator never registered.
    bundle = forge_bundle(shared_federation.store, tmp_path / "intruder", "intruder")
    data = site_data(tmp_path / "data", count=1)[0]
    site = join_site(processes, bundle.root, data, tmp_path / "site")
    code = site.wait(timeout=120)
    output = (tmp_path / "site.out").read_text() + (tmp_path / "site" / "logs" / "supernode.log").read_text()
    assert code == 1, output
    assert "intruder" not in online_nodes(shared_coordinator)


def test_revoked_hospital_is_cut_off_and_cannot_rejoin(
    shared_coordinator: CoordinatorHandle, shared_federation: Federation, processes: Processes, tmp_path: Path
) -> None:
    data = site_data(tmp_path / "data", count=1)[0]
    bundle_copy = tmp_path / "bundle-b"  # the hospital's own copy; revoke deletes the coordinator's
    shutil.copytree(shared_federation.bundle("hospital-b"), bundle_copy)
    site = join_site(processes, bundle_copy, data, tmp_path / "site-b")
    wait_until(lambda: "hospital-b" in online_nodes(shared_coordinator), 90, "hospital-b to come online")

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "certs",
            "revoke",
            str(shared_federation.store.root),
            "hospital-b",
            "--reason",
            "test",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    assert site.wait(timeout=90) == 1
    assert "revoked" in (tmp_path / "site-b.out").read_text()
    assert not shared_federation.bundle("hospital-b").exists()
    wait_until(lambda: "hospital-b" not in online_nodes(shared_coordinator), 60, "hospital-b to be dropped")
    again = join_site(processes, bundle_copy, data, tmp_path / "site-b-again")
    assert again.wait(timeout=90) == 1
    assert "revoked" in (tmp_path / "site-b-again.out").read_text()
