"""The federation's certificate authority: it signs the gateway's server certificate, one client
certificate per hospital, and the certificate revocation list.

A hospital's client certificate carries the fingerprint of that hospital's Flower node key in a URI
subject alternative name (`urn:visionfm:node-key:sha256:<hex>`), so the gateway can check that the
node key a request is signed with belongs to the hospital whose certificate opened the connection.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.errors import CertificateError
from certs.participants import is_ip

NODE_KEY_URI_PREFIX = "urn:visionfm:node-key:sha256:"
# Marks a coordinator operator's client certificate (dashboard access); hospital certificates never carry it.
OPERATOR_ROLE_URI = "urn:visionfm:role:operator"
# Issue certificates valid from slightly in the past so a peer whose clock lags a little accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class Validity:
    """The not-before/not-after window of a certificate."""

    not_before: dt.datetime
    not_after: dt.datetime

    @classmethod
    def days_from_now(cls, days: int) -> Validity:
        start = utcnow() - CLOCK_SKEW
        return cls(start, start + dt.timedelta(days=days))


def _name(common_name: str, organisation: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _general_names(names: Iterable[str]) -> list[x509.GeneralName]:
    result: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):  # keep order, drop duplicates
        if is_ip(name):
            result.append(x509.IPAddress(ipaddress.ip_address(name)))
        else:
            result.append(x509.DNSName(name))
    return result


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not cert_sign,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def create_ca(key: ec.EllipticCurvePrivateKey, federation: str, validity: Validity) -> x509.Certificate:
    """A self-signed CA certificate that may sign leaf certificates only (path length 0)."""
    name = _name(f"{federation} federation CA", federation)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity.not_before)
        .not_valid_after(validity.not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )


def _leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    public_key: ec.EllipticCurvePublicKey,
    common_name: str,
    validity: Validity,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName],
) -> x509.Certificate:
    organisation = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, str(organisation)))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity.not_before)
        .not_valid_after(validity.not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )


def server_sans(host: str, extra: Sequence[str] = ()) -> list[str]:
    """The gateway's names: its public host, extras, and loopback (the SuperLink is reached there)."""
    return [host, *extra, "localhost", "127.0.0.1"]


def issue_server_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    public_key: ec.EllipticCurvePublicKey,
    host: str,
    validity: Validity,
    extra_sans: Sequence[str] = (),
) -> x509.Certificate:
    """The coordinator's TLS server certificate (gateway and the loopback SuperLink share it)."""
    sans = _general_names(server_sans(host, extra_sans))
    return _leaf(ca_cert, ca_key, public_key, host, validity, ExtendedKeyUsageOID.SERVER_AUTH, sans)


def issue_hospital_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    public_key: ec.EllipticCurvePublicKey,
    hospital: str,
    node_key_fingerprint: str,
    validity: Validity,
) -> x509.Certificate:
    """A hospital's TLS client certificate, bound to its Flower node key by fingerprint."""
    sans: list[x509.GeneralName] = [
        x509.DNSName(hospital),
        x509.UniformResourceIdentifier(NODE_KEY_URI_PREFIX + node_key_fingerprint),
    ]
    return _leaf(ca_cert, ca_key, public_key, hospital, validity, ExtendedKeyUsageOID.CLIENT_AUTH, sans)


def issue_operator_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    public_key: ec.EllipticCurvePublicKey,
    operator: str,
    validity: Validity,
) -> x509.Certificate:
    """A coordinator operator's TLS client certificate (the dashboard admits these, not hospitals')."""
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(OPERATOR_ROLE_URI)]
    return _leaf(ca_cert, ca_key, public_key, operator, validity, ExtendedKeyUsageOID.CLIENT_AUTH, sans)


def has_operator_role(cert: x509.Certificate) -> bool:
    """True when `cert` was issued to a coordinator operator (see `issue_operator_cert`)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return OPERATOR_ROLE_URI in sans.get_values_for_type(x509.UniformResourceIdentifier)


def build_crl(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    revoked: Iterable[tuple[int, dt.datetime]],
    next_update_days: int = 30,
) -> x509.CertificateRevocationList:
    """A CRL listing `(serial, revoked_at)` pairs, signed by the CA."""
    now = utcnow()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(now + dt.timedelta(days=next_update_days))
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    return builder.sign(ca_key, hashes.SHA384())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def load_cert(path: Path) -> x509.Certificate:
    """Load one PEM certificate; CertificateError naming the file when it is missing or malformed."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError as exc:
        raise CertificateError(str(path), "certificate file not found") from exc
    except ValueError as exc:
        raise CertificateError(str(path), f"not a PEM certificate ({exc})") from exc


def common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def node_key_fingerprint_of(cert: x509.Certificate) -> str | None:
    """The node-key fingerprint a hospital certificate is bound to, or None."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(NODE_KEY_URI_PREFIX):
            return uri[len(NODE_KEY_URI_PREFIX) :]
    return None


def san_names(cert: x509.Certificate) -> list[str]:
    """DNS names and IP addresses in the subject alternative names."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        *sans.get_values_for_type(x509.DNSName),
        *(str(ip) for ip in sans.get_values_for_type(x509.IPAddress)),
    ]


def signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """True when `ca_cert`'s key signed `cert` (and the issuer names match)."""
    if cert.issuer != ca_cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
