"""Operator certificates and the dashboard's access policy, on real certificates: an operator's certificate
opens the dashboard, a hospital's (same CA) does not, a revoked operator's is refused at once, and the
PKCS#12 file a browser imports holds the same certificate."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs12

from certs.authority import has_operator_role, load_cert
from certs.operators import issue_operator, revoke_operator
from certs.store import CertStore
from certs.verify import has_errors, verify_path
from server.ops.dashboard.access import OperatorPolicy
from visionfm_core.errors import ConfigError


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(Encoding.PEM).decode()


def test_only_unrevoked_operator_certificates_open_the_dashboard(store: CertStore) -> None:
    files = issue_operator(store.root, "alice")
    alice = load_cert(files.cert)
    assert has_operator_role(alice) and alice.subject.rfc4514_string().startswith("CN=alice")
    assert oct(files.key.stat().st_mode & 0o777) == "0o600" and oct(files.pkcs12.stat().st_mode & 0o777) == "0o600"
    bundle = pkcs12.load_pkcs12(files.pkcs12.read_bytes(), files.pkcs12_passphrase.read_text().strip().encode())
    assert bundle.cert is not None and bundle.cert.certificate == alice

    policy = OperatorPolicy(store)
    assert policy.decide(_pem(alice)).allowed and policy.decide(_pem(alice)).operator == "alice"
    hospital = load_cert(store.hospital("hospital-a").client_cert)
    refused = policy.decide(_pem(hospital))
    assert not has_operator_role(hospital) and (refused.allowed, refused.status) == (False, 403)
    assert policy.decide(None).status == 401

    revoke_operator(store.root, "alice", "left the team")
    policy.revocations.refresh(force=True)
    revoked = policy.decide(_pem(alice))
    assert not revoked.allowed and "revoked" in revoked.reason
    # The CRL the TLS handshake checks lists it too (a restarted coordinator refuses it in the handshake).
    crl = x509.load_pem_x509_crl(store.crl.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(alice.serial_number) is not None
    # Issuing again is the CA holder's deliberate act: the new certificate works, the revoked one stays out.
    again = load_cert(issue_operator(store.root, "alice").cert)
    assert policy.decide(_pem(again)).allowed and not policy.decide(_pem(alice)).allowed
    assert not has_errors(verify_path(store.root))


def test_an_operator_name_that_is_not_a_plain_name_is_refused(store: CertStore) -> None:
    with pytest.raises(ConfigError, match="operator"):
        issue_operator(store.root, "../alice")
