"""`verify` explains what is wrong: each broken set yields an error naming the file and the problem."""

from __future__ import annotations

import datetime as dt
import os
import shutil

from certs.authority import Validity, cert_pem, create_ca, issue_hospital_cert, load_cert, utcnow
from certs.keys import (
    load_openssh_public_key,
    load_private_key,
    new_ec_key,
    private_pem,
    public_key_fingerprint,
    public_openssh,
    write_public,
)
from certs.store import CertStore
from certs.verify import has_errors, verify_bundle, verify_path, verify_store
from tests.unit.certs.conftest import PARTICIPANTS


def _errors(findings: list) -> list[str]:  # type: ignore[type-arg]
    return [f"{f.path}: {f.message}" for f in findings if f.level == "error"]


def test_a_freshly_issued_folder_and_its_bundles_verify_clean(store: CertStore) -> None:
    assert verify_store(store.root) == []
    assert verify_path(store.bundle_dir("hospital-a")) == []


def test_expired_certificate(store: CertStore) -> None:
    later = utcnow() + dt.timedelta(days=120)  # the leaf certificates live 90 days
    findings = verify_bundle(store.bundle_dir("hospital-a"), now=later)
    assert any("client.crt" in e and "expired" in e for e in _errors(findings))


def test_soon_expiring_certificate_is_a_warning(store: CertStore) -> None:
    soon = utcnow() + dt.timedelta(days=80)
    findings = verify_bundle(store.bundle_dir("hospital-a"), now=soon)
    assert not has_errors(findings)
    assert any("expires on" in f.message for f in findings)


def test_readable_private_key(store: CertStore) -> None:
    key = store.bundle_dir("hospital-a") / "node.key"
    os.chmod(key, 0o644)
    assert any("node.key" in e and "chmod 600" in e for e in _errors(verify_bundle(key.parent)))


def test_certificate_from_another_ca(store: CertStore) -> None:
    bundle = store.bundle_dir("hospital-a")
    other_key = new_ec_key()
    other_ca = create_ca(other_key, "elsewhere", Validity.days_from_now(30))
    fingerprint = public_key_fingerprint(load_openssh_public_key(bundle / "node.pub"))
    forged = issue_hospital_cert(
        other_ca,
        other_key,
        load_private_key(bundle / "client.key").public_key(),
        "hospital-a",
        fingerprint,
        Validity.days_from_now(30),
    )
    write_public(bundle / "client.crt", cert_pem(forged))
    assert any("client.crt" in e and "another CA" in e for e in _errors(verify_bundle(bundle)))


def test_replaced_ca_file_in_a_bundle(store: CertStore) -> None:
    bundle = store.bundle_dir("hospital-a")
    other = create_ca(new_ec_key(), "elsewhere", Validity.days_from_now(30))
    write_public(bundle / "ca.crt", cert_pem(other))
    errors = _errors(verify_bundle(bundle))
    assert any("ca.crt" in e and "fingerprint differs" in e for e in errors)
    assert any("client.crt" in e and "another CA" in e for e in errors)


def test_node_key_that_the_certificate_is_not_bound_to(store: CertStore) -> None:
    bundle = store.bundle_dir("hospital-a")
    write_public(bundle / "node.pub", public_openssh(new_ec_key().public_key()))
    errors = _errors(verify_bundle(bundle))
    assert any("client.crt" in e and "another node key" in e for e in errors)
    assert any("node.key" in e and "does not match" in e for e in errors)


def test_foreign_private_key_in_a_bundle(store: CertStore) -> None:
    bundle = store.bundle_dir("hospital-a")
    shutil.copy(store.ca_key, bundle / "ca.key")
    assert any("ca.key" in e and "does not belong" in e for e in _errors(verify_bundle(bundle)))


def test_tls_key_that_does_not_match_its_certificate(store: CertStore) -> None:
    bundle = store.bundle_dir("hospital-a")
    (bundle / "client.key").write_bytes(private_pem(new_ec_key()))
    assert any("client.crt" in e and "private key" in e for e in _errors(verify_bundle(bundle)))


def test_bundle_for_another_coordinator_address(store: CertStore) -> None:
    findings = verify_bundle(store.bundle_dir("hospital-a"), expected_address="fl.other.org:9443")
    assert any("differs" in e for e in _errors(findings))


def test_server_certificate_without_the_new_address(store: CertStore) -> None:
    store.participants.write_text(PARTICIPANTS.replace("fl.example.org:9443", "fl2.example.org:9443"))
    errors = _errors(verify_store(store.root))
    assert any("server.crt" in e and "fl2.example.org" in e for e in errors)


def test_missing_bundle_and_unlisted_revocation(store: CertStore) -> None:
    shutil.rmtree(store.bundle_dir("hospital-b"))
    revoked = {
        "hospital-x": {
            "name": "hospital-x",
            "revoked_at": "2026-01-01T00:00:00+00:00",
            "reason": "test",
            "serials": ["abc123"],
            "node_key_fingerprints": [],
        }
    }
    import json

    store.revoked_register.write_text(json.dumps(revoked))
    errors = _errors(verify_store(store.root))
    assert any("hospital-b" in e and "bundle missing" in e for e in errors)
    assert any("crl.pem" in e and "every revoked" in e for e in errors)


def test_certificate_verified_against_the_right_ca(store: CertStore) -> None:
    ca = load_cert(store.ca_cert)
    other = create_ca(new_ec_key(), "elsewhere", Validity.days_from_now(30))
    assert verify_bundle(store.bundle_dir("hospital-a"), expected_ca=ca) == []
    assert any("current CA" in e for e in _errors(verify_bundle(store.bundle_dir("hospital-a"), expected_ca=other)))
