"""Bundles that must be refused: expired, from another CA, bound to an unregistered node key."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from certs.authority import Validity, cert_pem, create_ca, issue_hospital_cert, load_cert, utcnow
from certs.bundle import HospitalBundle, write_bundle
from certs.keys import (
    load_openssh_public_key,
    load_private_key,
    new_ec_key,
    private_openssh,
    private_pem,
    public_key_fingerprint,
    public_openssh,
    write_private,
    write_public,
)
from certs.store import CertStore, HospitalFiles


def forge_bundle(
    store: CertStore,
    target: Path,
    hospital: str,
    *,
    validity: Validity | None = None,
    foreign_ca: bool = False,
    reuse_node_key_of: str | None = None,
) -> HospitalBundle:
    """A bundle for `hospital` signed by the federation CA (or a fresh foreign CA), with a new node key
    unless `reuse_node_key_of` names a provisioned hospital whose key to reuse."""
    validity = validity or Validity.days_from_now(30)
    files = HospitalFiles(target.parent / f"{target.name}-files")
    if reuse_node_key_of is not None:
        source = store.hospital(reuse_node_key_of)
        write_private(files.node_key, source.node_key.read_bytes())
        write_public(files.node_pub, source.node_pub.read_bytes())
    else:
        node_key = new_ec_key()
        write_private(files.node_key, private_openssh(node_key))
        write_public(files.node_pub, public_openssh(node_key.public_key()))
    fingerprint = public_key_fingerprint(load_openssh_public_key(files.node_pub))
    if foreign_ca:
        ca_key = new_ec_key()
        ca_cert = create_ca(ca_key, "another-federation", Validity.days_from_now(365))
        ca_path = files.folder / "foreign-ca.crt"
        write_public(ca_path, cert_pem(ca_cert))
    else:
        ca_key = load_private_key(store.ca_key)
        ca_cert = load_cert(store.ca_cert)
        ca_path = store.ca_cert
    tls_key = new_ec_key()
    cert = issue_hospital_cert(ca_cert, ca_key, tls_key.public_key(), hospital, fingerprint, validity)
    write_private(files.client_key, private_pem(tls_key))
    write_public(files.client_cert, cert_pem(cert))
    return write_bundle(
        target,
        federation="test-fed",
        hospital=hospital,
        coordinator_address=_coordinator_address(store),
        ca_cert_path=ca_path,
        files=files,
    )


def _coordinator_address(store: CertStore) -> str:
    from certs.participants import load_participants

    return load_participants(store.participants).coordinator.address


def expired() -> Validity:
    end = utcnow() - dt.timedelta(days=1)
    return Validity(end - dt.timedelta(days=30), end)
