"""Real TLS handshakes with the issued certificates (in-process, loopback)."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

from certs.provision import revoke
from certs.store import CertStore
from certs.tls import client_context, server_context


def _handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, name: str = "fl.example.org", client_errors: list[str] | None = None
) -> str | None:
    """Run one handshake plus one byte each way; the server's verdict (None = accepted). The client's
    own error, if any, is appended to `client_errors`."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    verdict: list[str | None] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(tls.recv(1))
                verdict.append(None)
        except (ssl.SSLError, OSError) as exc:
            verdict.append(getattr(exc, "verify_message", None) or str(getattr(exc, "reason", exc)))

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port)) as raw, client.wrap_socket(raw, server_hostname=name) as tls:
            tls.sendall(b"x")
            tls.recv(1)
    except (ssl.SSLError, OSError) as exc:
        if client_errors is not None:
            client_errors.append(getattr(exc, "verify_message", None) or str(exc))
    thread.join(timeout=10)
    listener.close()
    return verdict[0] if verdict else "no verdict"


def _gateway(store: CertStore) -> ssl.SSLContext:
    return server_context(store.server_cert, store.server_key, store.ca_cert, store.crl)


def _hospital(store: CertStore, name: str, folder: Path | None = None) -> ssl.SSLContext:
    bundle = folder or store.bundle_dir(name)
    return client_context(bundle / "ca.crt", bundle / "client.crt", bundle / "client.key")


def test_hospital_certificate_opens_a_mutual_tls_connection(store: CertStore) -> None:
    assert _handshake(_gateway(store), _hospital(store, "hospital-a")) is None
    # The server certificate also serves the loopback SuperLink.
    assert _handshake(_gateway(store), _hospital(store, "hospital-a"), name="127.0.0.1") is None


def test_client_without_certificate_is_refused(store: CertStore) -> None:
    assert _handshake(_gateway(store), client_context(store.ca_cert)) is not None


def test_server_name_outside_the_certificate_is_refused_by_the_client(store: CertStore) -> None:
    errors: list[str] = []
    _handshake(_gateway(store), _hospital(store, "hospital-a"), name="evil.example.org", client_errors=errors)
    assert errors and "mismatch" in errors[0].lower()


def test_revoked_certificate_fails_the_handshake(store: CertStore, tmp_path: Path) -> None:
    kept = tmp_path / "bundle-b"  # the hospital's own copy survives the revocation
    import shutil

    shutil.copytree(store.bundle_dir("hospital-b"), kept)
    assert _handshake(_gateway(store), _hospital(store, "hospital-b", kept)) is None
    revoke(store.root, "hospital-b")
    verdict = _handshake(_gateway(store), _hospital(store, "hospital-b", kept))
    assert verdict is not None and "REVOKED" in verdict.upper()
    assert _handshake(_gateway(store), _hospital(store, "hospital-a")) is None
