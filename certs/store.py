"""The coordinator's provisioning folder: where every certificate, key, bundle and register lives.

```
<root>/participants.toml          the declaration the folder was issued from (a copy)
<root>/ca/ca.crt, ca.key          the federation CA (key 0600; never leaves this folder)
<root>/ca/crl.pem                 revoked certificates, signed by the CA
<root>/ca/issued.json             every certificate issued: serial, kind, subject, expiry, node key
<root>/ca/revoked.json            revoked hospitals: certificate serials and node-key fingerprints
<root>/coordinator/server.crt     the gateway's and SuperLink's TLS certificate (+ server.key 0600)
<root>/hospitals/<name>/          client.crt, client.key, node.key, node.pub of one hospital
<root>/bundles/<name>/            what is handed to that hospital, and nothing else
<root>/operators/<name>/          an operator's dashboard client certificate (+ key, PKCS#12 for browsers)
```
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from certs.errors import CertificateError
from certs.keys import write_public


@dataclass
class IssuedCert:
    """One line of the issue register."""

    serial: str  # hex, as OpenSSL prints it
    kind: str  # "ca", "server", "hospital" or "operator"
    subject: str
    not_after: str  # ISO 8601
    node_key_fingerprint: str | None = None


@dataclass
class RevokedHospital:
    """A hospital that may no longer join: its certificates and node keys are refused."""

    name: str
    revoked_at: str
    reason: str
    serials: list[str] = field(default_factory=list)
    node_key_fingerprints: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class HospitalFiles:
    """The coordinator-side copies of one hospital's credentials."""

    folder: Path

    @property
    def client_cert(self) -> Path:
        return self.folder / "client.crt"

    @property
    def client_key(self) -> Path:
        return self.folder / "client.key"

    @property
    def node_key(self) -> Path:
        return self.folder / "node.key"

    @property
    def node_pub(self) -> Path:
        return self.folder / "node.pub"


@dataclass(frozen=True)
class CertStore:
    """Paths and registers of one provisioning folder."""

    root: Path

    @property
    def participants(self) -> Path:
        return self.root / "participants.toml"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def crl(self) -> Path:
        return self.root / "ca" / "crl.pem"

    @property
    def issued_register(self) -> Path:
        return self.root / "ca" / "issued.json"

    @property
    def revoked_register(self) -> Path:
        return self.root / "ca" / "revoked.json"

    @property
    def server_cert(self) -> Path:
        return self.root / "coordinator" / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "coordinator" / "server.key"

    def hospital(self, name: str) -> HospitalFiles:
        return HospitalFiles(self.root / "hospitals" / name)

    def bundle_dir(self, name: str) -> Path:
        return self.root / "bundles" / name

    def operator_dir(self, name: str) -> Path:
        """`<root>/operators/<name>/`: an operator's dashboard certificate, key and PKCS#12 bundle."""
        return self.root / "operators" / name

    def require(self) -> CertStore:
        """Raise CertificateError unless this looks like an issued folder."""
        for path in (self.ca_cert, self.server_cert, self.participants):
            if not path.exists():
                raise CertificateError(str(path), "missing: run `visionfm-server certs issue` first")
        return self

    # Registers --------------------------------------------------------------------------------

    def read_issued(self) -> list[IssuedCert]:
        return [IssuedCert(**row) for row in _read_json(self.issued_register, [])]

    def append_issued(self, entry: IssuedCert) -> None:
        rows = [asdict(row) for row in self.read_issued()] + [asdict(entry)]
        write_public(self.issued_register, _dump(rows))

    def read_revoked(self) -> dict[str, RevokedHospital]:
        raw: dict[str, dict[str, Any]] = _read_json(self.revoked_register, {})
        return {name: RevokedHospital(**row) for name, row in raw.items()}

    def write_revoked(self, revoked: dict[str, RevokedHospital]) -> None:
        write_public(self.revoked_register, _dump({name: asdict(row) for name, row in revoked.items()}))


def _read_json(path: Path, default: Any) -> Any:
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CertificateError(str(path), f"register is not valid JSON ({exc})") from exc


def _dump(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def iso(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).isoformat(timespec="seconds")
