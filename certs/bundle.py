"""A hospital's bundle: exactly what one site needs to join, and nothing of anyone else's.

```
bundle.toml   federation, hospital name, coordinator address, CA fingerprint
ca.crt        the federation CA (to check the coordinator's certificate)
client.crt    this hospital's TLS client certificate
client.key    its private key (0600)
node.key      this hospital's Flower node key, OpenSSH (0600)
node.pub      the matching public key
```
The CA key, the coordinator's server key and other hospitals' keys are never copied here.
"""

from __future__ import annotations

import hashlib
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certs.errors import CertificateError
from certs.keys import make_private_dir, write_private, write_public
from certs.store import HospitalFiles

MANIFEST = "bundle.toml"
BUNDLE_FILES = ("bundle.toml", "ca.crt", "client.crt", "client.key", "node.key", "node.pub")


def cert_fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@dataclass(frozen=True)
class HospitalBundle:
    """A loaded bundle: its manifest values and the paths of its files."""

    root: Path
    federation: str
    hospital: str
    coordinator_address: str
    ca_fingerprint: str

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def client_cert(self) -> Path:
        return self.root / "client.crt"

    @property
    def client_key(self) -> Path:
        return self.root / "client.key"

    @property
    def node_key(self) -> Path:
        return self.root / "node.key"

    @property
    def node_pub(self) -> Path:
        return self.root / "node.pub"


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_bundle(
    target: Path,
    *,
    federation: str,
    hospital: str,
    coordinator_address: str,
    ca_cert_path: Path,
    files: HospitalFiles,
) -> HospitalBundle:
    """(Re)write a hospital's bundle folder from the coordinator's copies (folder 0700, keys 0600)."""
    if target.exists():
        shutil.rmtree(target)
    make_private_dir(target)
    ca_pem = ca_cert_path.read_bytes()
    fingerprint = cert_fingerprint(x509.load_pem_x509_certificate(ca_pem))
    write_public(target / "ca.crt", ca_pem)
    write_public(target / "client.crt", files.client_cert.read_bytes())
    write_public(target / "node.pub", files.node_pub.read_bytes())
    write_private(target / "client.key", files.client_key.read_bytes())
    write_private(target / "node.key", files.node_key.read_bytes())
    manifest = "\n".join(
        [
            f"federation = {_toml_string(federation)}",
            f"hospital = {_toml_string(hospital)}",
            f"coordinator-address = {_toml_string(coordinator_address)}",
            f"ca-fingerprint = {_toml_string(fingerprint)}",
            "",
        ]
    )
    write_public(target / MANIFEST, manifest.encode())
    return load_bundle(target)


def load_bundle(root: str | Path) -> HospitalBundle:
    """Read a bundle's manifest; CertificateError naming the file when anything is missing."""
    root = Path(root)
    manifest = root / MANIFEST
    if not root.is_dir():
        raise CertificateError(str(root), "bundle folder not found")
    try:
        data = tomllib.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CertificateError(str(manifest), "bundle manifest missing (is this a hospital bundle?)") from exc
    except tomllib.TOMLDecodeError as exc:
        raise CertificateError(str(manifest), f"not valid TOML ({exc})") from exc
    values: dict[str, str] = {}
    for key in ("federation", "hospital", "coordinator-address", "ca-fingerprint"):
        value = data.get(key)
        if not isinstance(value, str) or not value:
            raise CertificateError(str(manifest), f"missing or empty key '{key}'")
        values[key] = value
    for name in BUNDLE_FILES:
        if not (root / name).is_file():
            raise CertificateError(str(root / name), "missing from the bundle")
    return HospitalBundle(
        root=root,
        federation=values["federation"],
        hospital=values["hospital"],
        coordinator_address=values["coordinator-address"],
        ca_fingerprint=values["ca-fingerprint"],
    )
