"""TLS contexts built from the federation's certificates: TLS 1.2 or newer, peers always verified."""

from __future__ import annotations

import ssl
from pathlib import Path


def server_context(
    cert: Path, key: Path, client_ca: Path | None = None, crl: Path | None = None
) -> ssl.SSLContext:
    """A server context; with `client_ca`, every client must present a certificate that CA signed
    (mutual TLS), and with `crl` a revoked client certificate fails the handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(client_ca))
        if crl is not None and crl.exists():
            context.load_verify_locations(cafile=str(crl))
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client context that trusts only `ca` (not the system store) and checks the host name;
    with `cert`/`key` it also presents a client certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key is not None else None)
    return context
