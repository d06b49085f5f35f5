"""Coordinator operators: people who may open the coordinator's dashboard.

An operator holds a TLS client certificate from the federation CA that carries the operator role
(`certs.authority.OPERATOR_ROLE_URI`) and is recorded as kind "operator" in the issue register. The
dashboard admits only such certificates: a hospital's certificate, though signed by the same CA, is
refused. A PKCS#12 file is written beside the PEM files for importing into a browser; its passphrase
is in a file readable by the owner only.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, pkcs12

from certs.authority import Validity, cert_pem, issue_operator_cert, load_cert, utcnow
from certs.keys import load_private_key, make_private_dir, new_ec_key, private_pem, write_private, write_public
from certs.participants import load_participants
from certs.provision import _register, _write_crl
from certs.store import CertStore, RevokedHospital, iso
from visionfm_core.errors import ConfigError

OPERATOR_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,61}[a-z0-9])?$")
# Revoked operators share the revocation register with hospitals under this prefix (no hospital name has a colon).
REVOKED_PREFIX = "operator:"


@dataclass(frozen=True)
class OperatorFiles:
    """An operator's credentials in the provisioning folder."""

    folder: Path

    @property
    def cert(self) -> Path:
        return self.folder / "operator.crt"

    @property
    def key(self) -> Path:
        return self.folder / "operator.key"

    @property
    def pkcs12(self) -> Path:
        return self.folder / "operator.p12"

    @property
    def pkcs12_passphrase(self) -> Path:
        return self.folder / "operator.p12.pass"


def _check_name(name: str) -> None:
    if not OPERATOR_NAME.match(name):
        raise ConfigError("operator", f"{name!r}: use lower-case letters, digits, '.', '_' or '-' (at most 63)")


def issue_operator(out_dir: str | Path, name: str, days: int | None = None) -> OperatorFiles:
    """Issue (or re-issue) operator `name`'s dashboard certificate; returns where its files are."""
    _check_name(name)
    store = CertStore(Path(out_dir)).require()
    participants = load_participants(store.participants)
    ca_cert, ca_key = load_cert(store.ca_cert), load_private_key(store.ca_key)
    key = new_ec_key()
    cert = issue_operator_cert(
        ca_cert, ca_key, key.public_key(), name, Validity.days_from_now(days or participants.leaf_validity_days)
    )
    files = OperatorFiles(store.operator_dir(name))
    make_private_dir(files.folder.parent)
    make_private_dir(files.folder)
    write_private(files.key, private_pem(key))
    write_public(files.cert, cert_pem(cert))
    passphrase = secrets.token_urlsafe(18)
    bundle = pkcs12.serialize_key_and_certificates(
        name.encode(), key, cert, [ca_cert], BestAvailableEncryption(passphrase.encode())
    )
    write_private(files.pkcs12, bundle)
    write_private(files.pkcs12_passphrase, (passphrase + "\n").encode())
    _register(store, cert, "operator", name)
    return files


def revoke_operator(out_dir: str | Path, name: str, reason: str = "unspecified") -> RevokedHospital:
    """Revoke every certificate issued to operator `name` (CRL and revocation register)."""
    store = CertStore(Path(out_dir)).require()
    serials = [row.serial for row in store.read_issued() if row.kind == "operator" and row.subject == name]
    if not serials:
        raise ConfigError("operator", f"no operator certificate was issued to {name!r} in {store.root}")
    record = RevokedHospital(name=name, revoked_at=iso(utcnow()), reason=reason, serials=serials)
    revoked = store.read_revoked()
    revoked[REVOKED_PREFIX + name] = record
    store.write_revoked(revoked)
    _write_crl(store)
    return record


def operator_serials(store: CertStore) -> frozenset[str]:
    """Serials (hex) of every operator certificate this CA issued (revoked ones included)."""
    return frozenset(row.serial for row in store.read_issued() if row.kind == "operator")
