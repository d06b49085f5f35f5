"""Key pairs and the files they live in: private keys are created 0600 and never readable by others.

TLS keys are PEM (PKCS#8); a hospital's Flower node key pair is EC P-384 in OpenSSH format, which is
what `flower-supernode --auth-supernode-private-key` and `flwr supernode register` read.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certs.errors import CertificateError

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def new_ec_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-384 private key (the curve Flower's node authentication uses)."""
    return ec.generate_private_key(ec.SECP384R1())


def make_private_dir(path: Path) -> Path:
    """Create `path` (and parents) readable by the owner only."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, PRIVATE_DIR_MODE)
    return path


def write_private(path: Path, data: bytes) -> Path:
    """Write secret bytes so that no other user can read them at any moment (0600 from creation)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)  # O_CREAT's mode is masked by umask and ignored for old files
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def write_public(path: Path, data: bytes) -> Path:
    """Write a certificate or public key (world readable is fine)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def private_openssh(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )


def public_openssh(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"


def public_key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 of the DER SubjectPublicKeyInfo, hex: one stable identity for a key in any encoding."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load a PEM (PKCS#8/SEC1) or OpenSSH EC private key."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise CertificateError(str(path), "private key file not found") from exc
    key: object
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(str(path), f"not a readable unencrypted private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(str(path), f"expected an EC private key, got {type(key).__name__}")
    return key


def load_openssh_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except FileNotFoundError as exc:
        raise CertificateError(str(path), "public key file not found") from exc
    except (ValueError, TypeError) as exc:
        raise CertificateError(str(path), f"not an OpenSSH public key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertificateError(str(path), f"expected an EC public key, got {type(key).__name__}")
    return key


def is_owner_only(path: Path) -> bool:
    """True when neither group nor others have any permission on `path`."""
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0
