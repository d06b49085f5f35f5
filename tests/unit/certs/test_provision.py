"""Issue, renew, revoke: inspect the real certificates and keys that land on disk."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs.authority import load_cert, node_key_fingerprint_of, signed_by
from certs.bundle import BUNDLE_FILES, load_bundle
from certs.keys import load_openssh_public_key, load_private_key, public_key_fingerprint
from certs.provision import issue, renew, revoke
from certs.store import CertStore
from tests.unit.certs.conftest import PARTICIPANTS, write_participants
from visionfm_core.errors import ConfigError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_is_a_self_signed_leaf_only_authority(store: CertStore) -> None:
    ca = load_cert(store.ca_cert)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert signed_by(ca, ca)
    assert load_private_key(store.ca_key).public_key() == ca.public_key()


def test_server_certificate_names_the_coordinator_and_loopback(store: CertStore) -> None:
    cert = load_cert(store.server_cert)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("127.0.0.1"),
    }
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert signed_by(cert, load_cert(store.ca_cert))
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 89 <= lifetime.days <= 90


def test_hospital_certificate_is_bound_to_its_node_key(store: CertStore) -> None:
    files = store.hospital("hospital-a")
    cert = load_cert(files.client_cert)
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "hospital-a"
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    node_pub = load_openssh_public_key(files.node_pub)
    assert node_key_fingerprint_of(cert) == public_key_fingerprint(node_pub)
    other = load_cert(store.hospital("hospital-b").client_cert)
    assert node_key_fingerprint_of(other) != public_key_fingerprint(node_pub)


def test_node_keys_are_what_flower_node_authentication_reads(store: CertStore) -> None:
    files = store.hospital("hospital-a")
    # --auth-supernode-private-key reads an OpenSSH EC private key; `flwr supernode register` an OpenSSH public key.
    private = serialization.load_ssh_private_key(files.node_key.read_bytes(), None)
    public = serialization.load_ssh_public_key(files.node_pub.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(public, ec.EllipticCurvePublicKey)
    assert private.curve.name == "secp384r1"
    assert private.public_key() == public


def test_private_keys_are_owner_only(store: CertStore) -> None:
    keys = [store.ca_key, store.server_key]
    for name in ("hospital-a", "hospital-b"):
        files = store.hospital(name)
        keys += [
            files.client_key,
            files.node_key,
            store.bundle_dir(name) / "client.key",
            store.bundle_dir(name) / "node.key",
        ]
    assert all(_mode(k) == 0o600 for k in keys), {str(k): oct(_mode(k)) for k in keys}
    for folder in (store.ca_key.parent, store.hospital("hospital-a").folder, store.bundle_dir("hospital-a")):
        assert _mode(folder) == 0o700


def test_a_bundle_holds_only_its_own_hospitals_credentials(store: CertStore) -> None:
    bundle = load_bundle(store.bundle_dir("hospital-a"))
    assert sorted(p.name for p in bundle.root.iterdir()) == sorted(BUNDLE_FILES)
    assert bundle.hospital == "hospital-a" and bundle.coordinator_address == "fl.example.org:9443"
    secrets = {p.read_bytes() for p in bundle.root.iterdir() if b"PRIVATE KEY" in p.read_bytes()}
    own = store.hospital("hospital-a")
    assert secrets == {own.client_key.read_bytes(), own.node_key.read_bytes()}
    others = {
        store.ca_key.read_bytes(),
        store.server_key.read_bytes(),
        store.hospital("hospital-b").client_key.read_bytes(),
        store.hospital("hospital-b").node_key.read_bytes(),
    }
    assert not secrets & others


def test_issue_is_idempotent_and_adds_new_hospitals_only(store: CertStore, tmp_path: Path) -> None:
    before = {p: p.read_bytes() for p in store.root.rglob("*") if p.is_file() and p.suffix in (".crt", ".key")}
    participants = write_participants(tmp_path / "more", PARTICIPANTS + '\n[[hospital]]\nname = "hospital-c"\n')
    report = issue(participants, store.root)
    assert report.created == ["hospital-c"]
    assert {"ca", "server", "hospital-a", "hospital-b"} <= set(report.kept)
    assert all(p.read_bytes() == data for p, data in before.items())
    assert load_bundle(store.bundle_dir("hospital-c")).hospital == "hospital-c"


def test_a_new_coordinator_address_reissues_the_server_certificate(store: CertStore, tmp_path: Path) -> None:
    moved = PARTICIPANTS.replace("fl.example.org:9443", "fl2.example.org:443")
    report = issue(write_participants(tmp_path / "moved", moved), store.root)
    assert "server" in report.created
    sans = load_cert(store.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl2.example.org" in sans.get_values_for_type(x509.DNSName)


def test_renew_issues_a_new_certificate_and_keeps_the_node_key(store: CertStore) -> None:
    files = store.hospital("hospital-a")
    old_cert, old_node = load_cert(files.client_cert), files.node_pub.read_bytes()
    assert renew(store.root, ["hospital-a"], days=10) == ["hospital-a"]
    new_cert = load_cert(files.client_cert)
    assert new_cert.serial_number != old_cert.serial_number
    assert new_cert.public_key() != old_cert.public_key()
    assert files.node_pub.read_bytes() == old_node
    assert (new_cert.not_valid_after_utc - new_cert.not_valid_before_utc).days == 10
    assert load_cert(store.bundle_dir("hospital-a") / "client.crt") == new_cert
    renew(store.root, ["hospital-a"], new_node_key=True)
    assert files.node_pub.read_bytes() != old_node
    assert node_key_fingerprint_of(load_cert(files.client_cert)) == public_key_fingerprint(
        load_openssh_public_key(files.node_pub)
    )


def test_revoke_lists_every_certificate_on_the_crl_and_drops_the_bundle(store: CertStore) -> None:
    renew(store.root, ["hospital-b"])  # two certificates issued to hospital-b now
    record = revoke(store.root, "hospital-b", reason="left the consortium")
    assert len(record.serials) == 2 and len(record.node_key_fingerprints) == 1
    crl = x509.load_pem_x509_crl(store.crl.read_bytes())
    assert crl.is_signature_valid(load_cert(store.ca_cert).public_key())  # type: ignore[arg-type]
    assert {format(e.serial_number, "x") for e in crl} == set(record.serials)
    assert not store.bundle_dir("hospital-b").exists()
    assert store.read_revoked()["hospital-b"].reason == "left the consortium"
    assert issue(store.participants, store.root).skipped_revoked == ["hospital-b"]
    with pytest.raises(ConfigError, match="revoked"):
        renew(store.root, ["hospital-b"])


def test_revoking_an_unknown_hospital_names_it(store: CertStore) -> None:
    with pytest.raises(ConfigError, match="hospital-z"):
        revoke(store.root, "hospital-z")
