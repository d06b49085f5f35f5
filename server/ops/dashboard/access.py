"""Who may see the dashboard: the gateway's TLS policy, narrowed to the coordinator's operators.

The TLS handshake (the gateway's `server_context`: the coordinator's certificate, client certificates
from the federation CA, the CRL) keeps out everyone without a certificate of this federation. Each
request then needs an operator certificate: the operator role in the certificate, recorded as an
operator's in the issue register, not revoked (the live revocation register, as at the gateway). A
hospital's certificate is signed by the same CA and is refused here.

Uvicorn does not pass the client certificate to the application, so its HTTP protocol is extended to
fill the ASGI TLS extension (`scope["extensions"]["tls"]["client_cert_chain"]`) from the connection.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from certs.authority import common_name, has_operator_role
from certs.operators import operator_serials
from certs.store import CertStore
from server.ops.gateway import RevocationRegister


@dataclass(frozen=True)
class AccessDecision:
    """`allowed`, or the HTTP status and the reason shown to the refused client."""

    allowed: bool
    status: int = 200
    reason: str = ""
    operator: str = ""


class OperatorPolicy:
    """Admit only operator certificates of this coordinator that are not revoked."""

    def __init__(self, store: CertStore) -> None:
        self.store = store
        # Checked at every request (a stat; re-read only when the file changed): a revoked operator is
        # refused from the next request on, however soon it comes.
        self.revocations = RevocationRegister(store.revoked_register, min_interval_s=0.0)

    def decide(self, cert_pem: str | None) -> AccessDecision:
        if not cert_pem:
            return AccessDecision(False, 401, "a client certificate is required")
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        serial = format(cert.serial_number, "x")
        if not has_operator_role(cert):
            return AccessDecision(False, 403, "only the coordinator's operator certificates open the dashboard")
        self.revocations.refresh()
        if serial in self.revocations.serials:
            return AccessDecision(False, 403, "this operator certificate is revoked")
        if serial not in operator_serials(self.store):
            return AccessDecision(False, 403, "this certificate is not in the coordinator's issue register")
        return AccessDecision(True, operator=common_name(cert))


def client_cert_pem(scope: Scope) -> str | None:
    """The client certificate of the request's connection, from the ASGI TLS extension."""
    chain = scope.get("extensions", {}).get("tls", {}).get("client_cert_chain") or []
    return str(chain[0]) if chain else None


class OperatorsOnly:
    """ASGI middleware: refuse (401/403, plain text) every request without an admitted certificate."""

    def __init__(self, app: ASGIApp, policy: OperatorPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        decision = self.policy.decide(client_cert_pem(scope))
        if not decision.allowed:
            await PlainTextResponse(decision.reason + "\n", status_code=decision.status)(scope, receive, send)
            return
        scope.setdefault("state", {})["operator"] = decision.operator
        await self.app(scope, receive, send)


def _with_tls_extension(app: ASGIApp, chain: list[str]) -> ASGIApp:
    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        extensions: dict[str, Any] = scope.setdefault("extensions", {})
        extensions["tls"] = {"client_cert_chain": chain, "client_cert_error": None}
        await app(scope, receive, send)

    return wrapped


class TLSIdentityH11Protocol(H11Protocol):
    """Uvicorn's h11 protocol, filling the ASGI TLS extension with the connection's client certificate."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        chain = [x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM).decode()] if der else []
        self.app = _with_tls_extension(self.app, chain)
