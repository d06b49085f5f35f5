"""Certificates and the CRL over time: a CRL dated 40 days back, certificates near expiry, renewals and
refreshes picked up by a running gateway without a restart (real TLS, dates made in the past/future)."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import time
from collections.abc import Iterator

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from certs.authority import crl_pem, load_cert, utcnow
from certs.keys import load_private_key, write_public
from certs.provision import crl_time_left, refresh_crl, renew, revoke
from certs.store import CertStore
from certs.tls import client_context
from certs.verify import coordinator_expiry, verify_store
from server.ops.gateway import FleetGateway, GatewayConfig
from tests.unit.certs.test_gateway import Upstream, upstream  # noqa: F401  (fixture)


def write_crl(store: CertStore, issued_days_ago: float, valid_days: float = 30, revoked: tuple[int, ...] = ()) -> None:
    """A CRL signed by the federation CA, issued `issued_days_ago` days ago for `valid_days` days."""
    ca, key = load_cert(store.ca_cert), load_private_key(store.ca_key)
    issued = utcnow() - dt.timedelta(days=issued_days_ago)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(issued)
        .next_update(issued + dt.timedelta(days=valid_days))
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(issued).build()
        )
    write_public(store.crl, crl_pem(builder.sign(key, hashes.SHA384())))


@pytest.fixture
def live_gateway(store: CertStore, upstream: Upstream) -> Iterator[FleetGateway]:  # noqa: F811
    config = GatewayConfig.from_store(store, "127.0.0.1", 0, upstream.port)
    config.reload_check_s = 0.0  # look at the files at every connection
    gw = FleetGateway(config)
    gw.start()
    yield gw
    gw.close()


def whoami(store: CertStore, gateway: FleetGateway, hospital: str = "hospital-a") -> httpx.Response:
    bundle = store.bundle_dir(hospital)
    context = client_context(bundle / "ca.crt", bundle / "client.crt", bundle / "client.key")
    with httpx.Client(verify=context, timeout=10) as client:
        return client.get(f"https://127.0.0.1:{gateway.port}/v1/gateway/whoami")


def test_crl_40_days_old_fails_verify_naming_it(store: CertStore) -> None:
    write_crl(store, issued_days_ago=40)
    errors = [f for f in verify_store(store.root) if f.level == "error"]
    assert [f.path for f in errors] == [str(store.crl)]
    assert "CRL expired on" in errors[0].message and "refresh-crl" in errors[0].message
    assert any(f.level == "error" and f.path == str(store.crl) for f in coordinator_expiry(store.root))


def test_crl_warned_14_days_ahead_not_before(store: CertStore) -> None:
    write_crl(store, issued_days_ago=20)  # 10 days left
    warned = [f for f in verify_store(store.root) if f.path == str(store.crl)]
    assert [f.level for f in warned] == ["warning"] and "CRL expires on" in warned[0].message
    write_crl(store, issued_days_ago=10)  # 20 days left
    assert not [f for f in verify_store(store.root) if f.path == str(store.crl)]


def test_certificates_near_expiry_are_warned_and_expired_ones_fail(store: CertStore) -> None:
    renew(store.root, ["hospital-a"], days=5)
    findings = coordinator_expiry(store.root, now=utcnow())
    assert not [f for f in findings if f.level == "error"]
    later = verify_store(store.root, now=utcnow() + dt.timedelta(days=6))
    client_cert = str(store.hospital("hospital-a").client_cert)
    assert any(f.level == "error" and f.path == client_cert and "expired on" in f.message for f in later)
    soon = verify_store(store.root)
    assert any(f.level == "warning" and f.path == client_cert and "renew it soon" in f.message for f in soon)


def test_refresh_crl_keeps_revocations_and_extends_the_expiry(store: CertStore) -> None:
    record = revoke(store.root, "hospital-b")
    write_crl(store, issued_days_ago=40, revoked=tuple(int(s, 16) for s in record.serials))
    left = crl_time_left(store)
    assert left is not None and left < dt.timedelta(0)
    assert refresh_crl(store.root) is True
    assert refresh_crl(store.root) is False  # fresh now: nothing to do
    crl = x509.load_pem_x509_crl(store.crl.read_bytes())
    assert {format(r.serial_number, "x") for r in crl} == set(record.serials)
    left = crl_time_left(store)
    assert left is not None and left > dt.timedelta(days=29)
    assert not [f for f in verify_store(store.root) if f.level == "error"]


def test_expired_crl_is_reported_to_sites_as_such_then_picked_up_live(
    store: CertStore, live_gateway: FleetGateway
) -> None:
    assert whoami(store, live_gateway).status_code == 200
    write_crl(store, issued_days_ago=40)
    time.sleep(0.05)  # a new mtime for the reload check
    refused = whoami(store, live_gateway)  # the handshake passes: no misleading "certificate expired"
    assert refused.status_code == 503
    detail = refused.json()["detail"]
    assert "certificate revocation list (ca/crl.pem) expired on" in detail and "refresh-crl" in detail
    refresh_crl(store.root)
    assert whoami(store, live_gateway).status_code == 200
    assert live_gateway.tls.reloads >= 2


def test_revocation_through_the_crl_takes_effect_without_restart(store: CertStore, live_gateway: FleetGateway) -> None:
    live_gateway.policy.revocations.path = None  # only the CRL at the handshake may refuse the site now
    assert whoami(store, live_gateway).status_code == 200
    serial = load_cert(store.hospital("hospital-a").client_cert).serial_number
    write_crl(store, issued_days_ago=0, revoked=(serial,))
    with pytest.raises(httpx.HTTPError) as refused:
        whoami(store, live_gateway)
    assert "revoked" in str(refused.value).lower() or isinstance(refused.value.__context__, ssl.SSLError)
    assert whoami(store, live_gateway, "hospital-b").status_code == 200


def test_renewed_server_certificate_is_served_without_restart(store: CertStore, live_gateway: FleetGateway) -> None:
    before = load_cert(store.server_cert).serial_number
    renew(store.root, server=True)
    after = load_cert(store.server_cert).serial_number
    assert before != after
    context = client_context(store.ca_cert)
    context.check_hostname = False
    # TLS 1.3: the client sees the server's certificate before the server asks for the client's.
    with socket.create_connection(("127.0.0.1", live_gateway.port), timeout=10) as raw, context.wrap_socket(
        raw, server_hostname="127.0.0.1"
    ) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None and x509.load_der_x509_certificate(der).serial_number == after
