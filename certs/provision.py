"""Issue, renew and revoke the federation's credentials from the participants file.

`issue` is idempotent: it creates what is missing (the CA, the server certificate, new hospitals) and
leaves existing credentials alone, so adding a hospital to the file and issuing again is safe.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from certs.authority import (
    Validity,
    build_crl,
    cert_pem,
    create_ca,
    crl_pem,
    issue_hospital_cert,
    issue_server_cert,
    load_cert,
    node_key_fingerprint_of,
    san_names,
    server_sans,
    utcnow,
)
from certs.bundle import write_bundle
from certs.errors import CertificateError
from certs.keys import (
    load_openssh_public_key,
    load_private_key,
    make_private_dir,
    new_ec_key,
    private_openssh,
    private_pem,
    public_key_fingerprint,
    public_openssh,
    write_private,
    write_public,
)
from certs.participants import Participants, load_participants
from certs.store import CertStore, IssuedCert, RevokedHospital, iso
from visionfm_core.errors import ConfigError

# The CRL's nextUpdate is this far ahead; a running coordinator re-signs it once less than
# CRL_REFRESH_BEFORE is left, so sites never meet an expired CRL while the coordinator runs.
CRL_VALIDITY_DAYS = 30
CRL_REFRESH_BEFORE = dt.timedelta(days=15)


@dataclass
class IssueReport:
    """What one `issue` call created (names), and what it left as it was."""

    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    skipped_revoked: list[str] = field(default_factory=list)


def _serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def _register(store: CertStore, cert: x509.Certificate, kind: str, subject: str, fp: str | None = None) -> None:
    store.append_issued(IssuedCert(_serial(cert), kind, subject, iso(cert.not_valid_after_utc), fp))


def _issue_ca(store: CertStore, participants: Participants) -> None:
    key = new_ec_key()
    cert = create_ca(key, participants.federation, Validity.days_from_now(participants.ca_validity_days))
    make_private_dir(store.ca_key.parent)
    write_private(store.ca_key, private_pem(key))
    write_public(store.ca_cert, cert_pem(cert))
    _register(store, cert, "ca", participants.federation)


def _issue_server(store: CertStore, participants: Participants, validity: Validity) -> None:
    ca_cert = load_cert(store.ca_cert)
    ca_key = load_private_key(store.ca_key)
    key = new_ec_key()
    coordinator = participants.coordinator
    cert = issue_server_cert(ca_cert, ca_key, key.public_key(), coordinator.host, validity, coordinator.extra_sans)
    make_private_dir(store.server_key.parent)
    write_private(store.server_key, private_pem(key))
    write_public(store.server_cert, cert_pem(cert))
    _register(store, cert, "server", coordinator.host)


def _issue_hospital(
    store: CertStore, participants: Participants, name: str, validity: Validity, new_node_key: bool
) -> None:
    ca_cert = load_cert(store.ca_cert)
    ca_key = load_private_key(store.ca_key)
    files = store.hospital(name)
    make_private_dir(files.folder)
    if new_node_key or not files.node_key.exists():
        node_key = new_ec_key()
        write_private(files.node_key, private_openssh(node_key))
        write_public(files.node_pub, public_openssh(node_key.public_key()))
    fingerprint = public_key_fingerprint(load_openssh_public_key(files.node_pub))
    tls_key = new_ec_key()
    cert = issue_hospital_cert(ca_cert, ca_key, tls_key.public_key(), name, fingerprint, validity)
    write_private(files.client_key, private_pem(tls_key))
    write_public(files.client_cert, cert_pem(cert))
    _register(store, cert, "hospital", name, fingerprint)
    write_bundle(
        store.bundle_dir(name),
        federation=participants.federation,
        hospital=name,
        coordinator_address=participants.coordinator.address,
        ca_cert_path=store.ca_cert,
        files=files,
    )


def issue(participants_path: str | Path, out_dir: str | Path) -> IssueReport:
    """Create the CA, the server certificate and every declared hospital's credentials that are missing."""
    participants = load_participants(participants_path)
    store = CertStore(Path(out_dir))
    make_private_dir(store.root)
    if store.participants.exists() and Path(participants_path).resolve() != store.participants.resolve():
        previous = load_participants(store.participants)
        if previous.federation != participants.federation:
            raise ConfigError(
                "federation.name",
                f"{store.root} was issued for {previous.federation!r}, not {participants.federation!r}",
            )
    if Path(participants_path).resolve() != store.participants.resolve():
        shutil.copyfile(participants_path, store.participants)
    report = IssueReport()
    validity = Validity.days_from_now(participants.leaf_validity_days)
    if not store.ca_cert.exists():
        _issue_ca(store, participants)
        report.created.append("ca")
    else:
        report.kept.append("ca")
    server_outdated = store.server_cert.exists() and not _server_matches(store, participants)
    if not store.server_cert.exists() or server_outdated:
        _issue_server(store, participants, validity)
        report.created.append("server")
    else:
        report.kept.append("server")
    revoked = store.read_revoked()
    for hospital in participants.hospitals:
        if hospital.name in revoked:
            report.skipped_revoked.append(hospital.name)
        elif store.hospital(hospital.name).client_cert.exists():
            report.kept.append(hospital.name)
        else:
            _issue_hospital(store, participants, hospital.name, validity, new_node_key=True)
            report.created.append(hospital.name)
    _write_crl(store)
    return report


def _server_matches(store: CertStore, participants: Participants) -> bool:
    """True when the server certificate still names the coordinator's current address."""
    names = set(san_names(load_cert(store.server_cert)))
    coordinator = participants.coordinator
    return set(server_sans(coordinator.host, coordinator.extra_sans)) <= names


def renew(
    out_dir: str | Path,
    hospitals: Sequence[str] = (),
    *,
    server: bool = False,
    days: int | None = None,
    new_node_key: bool = False,
) -> list[str]:
    """Issue fresh certificates (new TLS keys) for the named hospitals and/or the server.

    The node key is kept unless `new_node_key` (the SuperLink then needs the new key registered,
    which `visionfm-server start` does). Old certificates stay valid until they expire; revoke a
    hospital to cut it off at once.
    """
    store = CertStore(Path(out_dir)).require()
    participants = load_participants(store.participants)
    validity = Validity.days_from_now(days or participants.leaf_validity_days)
    revoked = store.read_revoked()
    renewed: list[str] = []
    if server:
        _issue_server(store, participants, validity)
        renewed.append("server")
    for name in hospitals:
        participants.hospital(name)  # ConfigError for an undeclared name
        if name in revoked:
            raise ConfigError("hospital", f"{name!r} is revoked; it cannot be renewed")
        _issue_hospital(store, participants, name, validity, new_node_key=new_node_key)
        renewed.append(name)
    return renewed


def revoke(out_dir: str | Path, hospital: str, reason: str = "unspecified") -> RevokedHospital:
    """Revoke every certificate and the node key of `hospital`; rewrite the CRL; drop its bundle."""
    store = CertStore(Path(out_dir)).require()
    files = store.hospital(hospital)
    if not files.folder.exists():
        raise ConfigError("hospital", f"no credentials were issued to {hospital!r} in {store.root}")
    issued = [row for row in store.read_issued() if row.kind == "hospital" and row.subject == hospital]
    fingerprints = sorted({row.node_key_fingerprint for row in issued if row.node_key_fingerprint})
    record = RevokedHospital(
        name=hospital,
        revoked_at=iso(utcnow()),
        reason=reason,
        serials=[row.serial for row in issued],
        node_key_fingerprints=fingerprints,
    )
    revoked = store.read_revoked()
    revoked[hospital] = record
    store.write_revoked(revoked)
    _write_crl(store)
    bundle = store.bundle_dir(hospital)
    if bundle.exists():
        shutil.rmtree(bundle)
    return record


def _write_crl(store: CertStore, next_update_days: int = CRL_VALIDITY_DAYS) -> None:
    ca_cert, ca_key = load_cert(store.ca_cert), load_private_key(store.ca_key)
    entries: list[tuple[int, dt.datetime]] = []
    for record in store.read_revoked().values():
        when = dt.datetime.fromisoformat(record.revoked_at)
        entries.extend((int(serial, 16), when) for serial in record.serials)
    write_public(store.crl, crl_pem(build_crl(ca_cert, ca_key, entries, next_update_days)))


def crl_time_left(store: CertStore, now: dt.datetime | None = None) -> dt.timedelta | None:
    """Time until the CRL's nextUpdate (negative once expired); None when it is missing or unreadable."""
    try:
        crl = x509.load_pem_x509_crl(store.crl.read_bytes())
    except (OSError, ValueError):
        return None
    if crl.next_update_utc is None:
        return None
    return crl.next_update_utc - (now or utcnow())


def refresh_crl(out_dir: str | Path, min_left: dt.timedelta = CRL_REFRESH_BEFORE, force: bool = False) -> bool:
    """Re-sign the CRL (same revocations, a fresh nextUpdate) when it expires within `min_left`, is
    missing or unreadable, or `force`; True when it was rewritten. Needs the CA key
    (CertificateError naming it otherwise)."""
    store = CertStore(Path(out_dir)).require()
    left = crl_time_left(store)
    if not force and left is not None and left > min_left:
        return False
    _write_crl(store)
    return True


def hospital_node_fingerprint(store: CertStore, name: str) -> str:
    """The node-key fingerprint a hospital's current certificate is bound to."""
    cert = load_cert(store.hospital(name).client_cert)
    fingerprint = node_key_fingerprint_of(cert)
    if fingerprint is None:
        raise CertificateError(str(store.hospital(name).client_cert), "no node-key binding in the certificate")
    return fingerprint
