"""The declarative participants file: who coordinates, at which address, and which hospitals take part.

```toml
[federation]
name = "eye-consortium"          # goes into every certificate's organisation field
validity-days = 397              # leaf certificates (server, hospitals); the CA lives 10 years

[coordinator]
address = "fl.example.org:9443"  # what hospitals dial: host (DNS name or IP) and port of the gateway
extra-sans = ["10.0.0.5"]        # further names or IPs the gateway is reached by (optional)

[[hospital]]
name = "moorfields-1"            # lower case letters, digits and dashes; unique
```
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visionfm_core.errors import ConfigError
from visionfm_core.toml_files import read_toml

NAME_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
DEFAULT_LEAF_VALIDITY_DAYS = 397  # the CA/Browser Forum ceiling for TLS leaf certificates
DEFAULT_CA_VALIDITY_DAYS = 3650


@dataclass(frozen=True)
class Coordinator:
    """The coordinator's public gateway address and any extra subject alternative names."""

    host: str
    port: int
    extra_sans: tuple[str, ...] = ()

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Hospital:
    """One participating site."""

    name: str


@dataclass(frozen=True)
class Participants:
    """The whole federation as declared in the participants file."""

    federation: str
    coordinator: Coordinator
    hospitals: tuple[Hospital, ...]
    leaf_validity_days: int = DEFAULT_LEAF_VALIDITY_DAYS
    ca_validity_days: int = DEFAULT_CA_VALIDITY_DAYS
    source: str = field(default="<participants>", compare=False)

    def hospital(self, name: str) -> Hospital:
        """The hospital called `name`; ConfigError when the file declares none."""
        for hospital in self.hospitals:
            if hospital.name == name:
                return hospital
        known = ", ".join(h.name for h in self.hospitals) or "none"
        raise ConfigError("hospital", f"no hospital named {name!r} in {self.source} (declared: {known})")


def split_address(address: str, key: str = "coordinator.address") -> tuple[str, int]:
    """Split 'host:port' or '[v6]:port' into (host, port); ConfigError naming `key` when malformed."""
    match = re.fullmatch(
        r"\[(?P<v6>[0-9a-fA-F:.]+)\]:(?P<port>\d+)|(?P<host>[^:\[\]\s]+):(?P<port2>\d+)", address
    )
    if match is None:
        raise ConfigError(key, f"{address!r} is not host:port")
    host = match.group("v6") or match.group("host")
    port = int(match.group("port") or match.group("port2"))
    if not 0 < port < 65536:
        raise ConfigError(key, f"port {port} is outside 1-65535")
    return host, port


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _require(table: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in table:
        raise ConfigError(f"{where}.{key}", "missing")
    value = table[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"{where}.{key}", f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def _positive_days(table: dict[str, Any], key: str, default: int, where: str) -> int:
    value = table.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{where}.{key}", f"must be a positive number of days, got {value!r}")
    return value


def parse_participants(data: dict[str, Any], source: str = "<participants>") -> Participants:
    """Validate a parsed participants table; every error names the key at fault."""
    unknown = set(data) - {"federation", "coordinator", "hospital"}
    if unknown:
        raise ConfigError(sorted(unknown)[0], f"unknown table in {source}")
    federation = data.get("federation", {})
    if not isinstance(federation, dict):
        raise ConfigError("federation", "must be a table")
    fed_name = _require(federation, "name", str, "federation")
    if not fed_name.strip():
        raise ConfigError("federation.name", "must not be empty")
    coordinator_table = data.get("coordinator")
    if not isinstance(coordinator_table, dict):
        raise ConfigError("coordinator", f"missing [coordinator] table in {source}")
    host, port = split_address(_require(coordinator_table, "address", str, "coordinator"))
    extra = coordinator_table.get("extra-sans", [])
    if not isinstance(extra, list) or not all(isinstance(s, str) and s for s in extra):
        raise ConfigError("coordinator.extra-sans", "must be a list of host names or IP addresses")
    hospitals_raw = data.get("hospital", [])
    if not isinstance(hospitals_raw, list) or not hospitals_raw:
        raise ConfigError("hospital", f"declare at least one [[hospital]] in {source}")
    hospitals: list[Hospital] = []
    for index, table in enumerate(hospitals_raw):
        where = f"hospital[{index}]"
        if not isinstance(table, dict):
            raise ConfigError(where, "must be a table")
        name = _require(table, "name", str, where)
        if not NAME_PATTERN.match(name):
            raise ConfigError(
                f"{where}.name", f"{name!r}: use lower case letters, digits and dashes (max 63)"
            )
        if any(h.name == name for h in hospitals):
            raise ConfigError(f"{where}.name", f"{name!r} is declared twice")
        hospitals.append(Hospital(name=name))
    return Participants(
        federation=fed_name,
        coordinator=Coordinator(host=host, port=port, extra_sans=tuple(extra)),
        hospitals=tuple(hospitals),
        leaf_validity_days=_positive_days(
            federation, "validity-days", DEFAULT_LEAF_VALIDITY_DAYS, "federation"
        ),
        ca_validity_days=_positive_days(
            federation, "ca-validity-days", DEFAULT_CA_VALIDITY_DAYS, "federation"
        ),
        source=source,
    )


def load_participants(path: str | Path) -> Participants:
    """Read and validate a participants TOML file."""
    path = Path(path)
    data = read_toml(path, "participants")
    return parse_participants(data, source=str(path))
