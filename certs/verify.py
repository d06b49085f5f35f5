"""Explain what is wrong with a certificate set: a coordinator's provisioning folder or a hospital bundle.

Every finding names the file it is about and says, in one line, what is wrong and what to do.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from certs.authority import (
    common_name,
    load_cert,
    node_key_fingerprint_of,
    san_names,
    server_sans,
    signed_by,
    utcnow,
)
from certs.bundle import MANIFEST, cert_fingerprint, load_bundle
from certs.errors import CertificateError
from certs.keys import is_owner_only, load_openssh_public_key, load_private_key, public_key_fingerprint
from certs.participants import load_participants, split_address
from certs.store import CertStore
from visionfm_core.errors import ConfigError

EXPIRY_WARNING = dt.timedelta(days=30)
# A CRL close to its nextUpdate: a running coordinator refreshes it 15 days ahead, so 14 days left
# means nothing refreshes it (coordinator stopped, or its CA key kept offline).
CRL_EXPIRY_WARNING = dt.timedelta(days=14)


@dataclass(frozen=True)
class Finding:
    """One problem: `level` is "error" (will not work) or "warning" (works, needs attention)."""

    level: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.level.upper()}: {self.path}: {self.message}"


class _Collector:
    def __init__(self) -> None:
        self.findings: list[Finding] = []

    def error(self, path: Path | str, message: str) -> None:
        self.findings.append(Finding("error", str(path), message))

    def warning(self, path: Path | str, message: str) -> None:
        self.findings.append(Finding("warning", str(path), message))

    def load_cert(self, path: Path) -> x509.Certificate | None:
        try:
            return load_cert(path)
        except CertificateError as exc:
            self.error(exc.path, exc.reason)
            return None

    def load_key(self, path: Path) -> ec.EllipticCurvePrivateKey | None:
        try:
            key = load_private_key(path)
        except CertificateError as exc:
            self.error(exc.path, exc.reason)
            return None
        if not is_owner_only(path):
            self.error(path, "private key is readable by other users: chmod 600")
        return key

    def check_validity(self, path: Path, cert: x509.Certificate, now: dt.datetime) -> None:
        if now < cert.not_valid_before_utc:
            self.error(
                path, f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check the clock)"
            )
        elif now > cert.not_valid_after_utc:
            self.error(path, f"expired on {cert.not_valid_after_utc:%Y-%m-%d}: renew it")
        elif cert.not_valid_after_utc - now < EXPIRY_WARNING:
            self.warning(path, f"expires on {cert.not_valid_after_utc:%Y-%m-%d}: renew it soon")

    def check_pair(self, cert_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        if cert.public_key() != key.public_key():
            self.error(cert_path, "does not match its private key")

    def check_issued_by(self, path: Path, cert: x509.Certificate, ca: x509.Certificate) -> bool:
        if not signed_by(cert, ca):
            self.error(path, "not signed by this federation's CA (from another CA, or the CA was replaced)")
            return False
        return True

    def check_node_binding(
        self, cert_path: Path, cert: x509.Certificate, node_pub: Path, node_key: Path
    ) -> None:
        bound = node_key_fingerprint_of(cert)
        try:
            public = load_openssh_public_key(node_pub)
        except CertificateError as exc:
            self.error(exc.path, exc.reason)
            return
        if bound is None:
            self.error(
                cert_path, "carries no node-key binding: reissue it with `visionfm-server certs renew`"
            )
        elif bound != public_key_fingerprint(public):
            self.error(cert_path, f"is bound to another node key than {node_pub.name}")
        private = self.load_key(node_key)
        if private is not None and private.public_key() != public:
            self.error(node_key, f"does not match {node_pub.name}")


def _check_ca(c: _Collector, path: Path, key_path: Path | None, now: dt.datetime) -> x509.Certificate | None:
    ca = c.load_cert(path)
    if ca is None:
        return None
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        c.error(path, "is not a CA certificate")
    if not signed_by(ca, ca):
        c.error(path, "is not self-signed")
    c.check_validity(path, ca, now)
    if key_path is not None:
        key = c.load_key(key_path)
        if key is not None:
            c.check_pair(path, ca, key)
    return ca


def verify_store(root: str | Path, now: dt.datetime | None = None) -> list[Finding]:
    """Check a coordinator's provisioning folder: CA, server certificate, every hospital, the CRL."""
    now = now or utcnow()
    store = CertStore(Path(root))
    c = _Collector()
    try:
        participants = load_participants(store.participants)
    except ConfigError as exc:
        c.error(store.participants, str(exc))
        return c.findings
    ca = _check_ca(c, store.ca_cert, store.ca_key, now)
    if ca is None:
        return c.findings
    server = c.load_cert(store.server_cert)
    if server is not None and c.check_issued_by(store.server_cert, server, ca):
        c.check_validity(store.server_cert, server, now)
        coordinator = participants.coordinator
        missing = set(server_sans(coordinator.host, coordinator.extra_sans)) - set(san_names(server))
        if missing:
            c.error(
                store.server_cert,
                f"lacks the names {sorted(missing)}: `visionfm-server certs renew --server`",
            )
        key = c.load_key(store.server_key)
        if key is not None:
            c.check_pair(store.server_cert, server, key)
    revoked = store.read_revoked()
    revoked_serials = {serial for record in revoked.values() for serial in record.serials}
    for hospital in participants.hospitals:
        files = store.hospital(hospital.name)
        if hospital.name in revoked:
            if store.bundle_dir(hospital.name).exists():
                c.error(
                    store.bundle_dir(hospital.name), "bundle of a revoked hospital still exists: delete it"
                )
            continue
        cert = c.load_cert(files.client_cert)
        if cert is None:
            continue
        if format(cert.serial_number, "x") in revoked_serials:
            c.error(files.client_cert, "is revoked")
        if c.check_issued_by(files.client_cert, cert, ca):
            c.check_validity(files.client_cert, cert, now)
        key = c.load_key(files.client_key)
        if key is not None:
            c.check_pair(files.client_cert, cert, key)
        c.check_node_binding(files.client_cert, cert, files.node_pub, files.node_key)
        bundle = store.bundle_dir(hospital.name)
        if not bundle.exists():
            c.error(bundle, "bundle missing: run `visionfm-server certs issue` again")
        else:
            c.findings.extend(verify_bundle(bundle, now=now, expected_ca=ca))
    declared = {h.name for h in participants.hospitals}
    hospitals_dir = store.root / "hospitals"
    for folder in sorted(hospitals_dir.iterdir()) if hospitals_dir.exists() else []:
        if folder.name not in declared and folder.name not in revoked:
            c.warning(folder, "credentials for a hospital no longer in the participants file: revoke it")
    _check_crl(c, store, ca, revoked_serials, now)
    return c.findings


def crl_expiry(path: Path, crl: x509.CertificateRevocationList, now: dt.datetime) -> Finding | None:
    """An error once the CRL's nextUpdate has passed, a warning within CRL_EXPIRY_WARNING of it."""
    next_update = crl.next_update_utc
    if next_update is None:
        return None
    fix = "run `visionfm-server certs refresh-crl` (a running coordinator with its CA key does it itself)"
    if next_update <= now:
        return Finding(
            "error", str(path), f"CRL expired on {next_update:%Y-%m-%d %H:%M} UTC: every site is refused; {fix}"
        )
    if next_update - now < CRL_EXPIRY_WARNING:
        return Finding("warning", str(path), f"CRL expires on {next_update:%Y-%m-%d %H:%M} UTC: {fix}")
    return None


def coordinator_expiry(root: str | Path, now: dt.datetime | None = None) -> list[Finding]:
    """What will stop the coordinator accepting sites soon: its CRL, server and CA certificates."""
    now = now or utcnow()
    store = CertStore(Path(root))
    c = _Collector()
    for path in (store.ca_cert, store.server_cert):
        cert = c.load_cert(path)
        if cert is not None:
            c.check_validity(path, cert, now)
    try:
        crl = x509.load_pem_x509_crl(store.crl.read_bytes())
    except FileNotFoundError:
        c.error(store.crl, "CRL missing: run `visionfm-server certs refresh-crl`")
        return c.findings
    except ValueError as exc:
        c.error(store.crl, f"not a PEM CRL ({exc})")
        return c.findings
    finding = crl_expiry(store.crl, crl, now)
    if finding is not None:
        c.findings.append(finding)
    return c.findings


def _check_crl(
    c: _Collector, store: CertStore, ca: x509.Certificate, revoked_serials: set[str], now: dt.datetime
) -> None:
    try:
        crl = x509.load_pem_x509_crl(store.crl.read_bytes())
    except FileNotFoundError:
        c.error(store.crl, "CRL missing: run `visionfm-server certs issue` again")
        return
    except ValueError as exc:
        c.error(store.crl, f"not a PEM CRL ({exc})")
        return
    if not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        c.error(store.crl, "not signed by this federation's CA")
    listed = {format(entry.serial_number, "x") for entry in crl}
    if revoked_serials - listed:
        c.error(store.crl, "does not list every revoked certificate: revoke again to rewrite it")
    finding = crl_expiry(store.crl, crl, now)
    if finding is not None:
        c.findings.append(finding)


def verify_bundle(
    root: str | Path,
    now: dt.datetime | None = None,
    expected_ca: x509.Certificate | None = None,
    expected_address: str | None = None,
) -> list[Finding]:
    """Check a hospital bundle: complete, signed by its CA, in date, keys private and matching."""
    now = now or utcnow()
    c = _Collector()
    try:
        bundle = load_bundle(root)
    except CertificateError as exc:
        c.error(exc.path, exc.reason)
        return c.findings
    ca = _check_ca(c, bundle.ca_cert, None, now)
    if ca is None:
        return c.findings
    if cert_fingerprint(ca) != bundle.ca_fingerprint:
        c.error(bundle.ca_cert, f"fingerprint differs from the one in {MANIFEST}: the CA file was replaced")
    if expected_ca is not None and cert_fingerprint(ca) != cert_fingerprint(expected_ca):
        c.error(bundle.ca_cert, "is not the coordinator's current CA")
    try:
        split_address(bundle.coordinator_address, "coordinator-address")
    except ConfigError as exc:
        c.error(bundle.root / MANIFEST, str(exc))
    if expected_address is not None and expected_address != bundle.coordinator_address:
        c.error(
            bundle.root / MANIFEST,
            f"coordinator address {bundle.coordinator_address!r} differs from {expected_address!r}",
        )
    cert = c.load_cert(bundle.client_cert)
    if cert is not None:
        if c.check_issued_by(bundle.client_cert, cert, ca):
            c.check_validity(bundle.client_cert, cert, now)
        if common_name(cert) != bundle.hospital:
            c.error(bundle.client_cert, f"issued to {common_name(cert)!r}, not to {bundle.hospital!r}")
        key = c.load_key(bundle.client_key)
        if key is not None:
            c.check_pair(bundle.client_cert, cert, key)
        c.check_node_binding(bundle.client_cert, cert, bundle.node_pub, bundle.node_key)
    for path in sorted(bundle.root.rglob("*")):
        if (
            path.is_file()
            and path.name not in ("client.key", "node.key")
            and b"PRIVATE KEY" in path.read_bytes()
        ):
            c.error(path, "a private key that does not belong in a hospital bundle: delete it")
    return c.findings


def verify_path(root: str | Path, now: dt.datetime | None = None) -> list[Finding]:
    """Verify either kind of folder: a bundle (it has bundle.toml) or a provisioning folder."""
    root = Path(root)
    if (root / MANIFEST).exists():
        return verify_bundle(root, now=now)
    if not root.exists():
        return [Finding("error", str(root), "folder not found")]
    return verify_store(root, now=now)


def has_errors(findings: list[Finding]) -> bool:
    return any(f.level == "error" for f in findings)
