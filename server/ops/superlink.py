"""The coordinator's SuperLink: TLS, node authentication, state on disk, reachable on loopback only."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from certs.store import CertStore
from strategies.protocol.processes import flower_env, flower_script, spawn, stop_tree, wait_for_port

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class SuperLinkSpec:
    """How to start the SuperLink: its loopback port, the certificates, and the state folder."""

    port: int
    store: CertStore
    state_dir: Path

    @property
    def database(self) -> Path:
        return self.state_dir / "superlink.db"

    @property
    def home(self) -> Path:
        return self.state_dir / "flwr-home"

    @property
    def log(self) -> Path:
        return self.state_dir / "logs" / "superlink.log"

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"


def superlink_command(spec: SuperLinkSpec) -> list[str]:
    """`flower-superlink` bound to loopback: hospitals reach it only through the fleet gateway."""
    store = spec.store
    return [
        flower_script("flower-superlink"),
        "--host",
        LOOPBACK,
        "--port",
        str(spec.port),
        "--ssl-ca-certfile",
        str(store.ca_cert),
        "--ssl-certfile",
        str(store.server_cert),
        "--ssl-keyfile",
        str(store.server_key),
        "--enable-supernode-auth",
        "--database",
        str(spec.database),
        "--disable-runtime-dependency-installation",
    ]


def start_superlink(spec: SuperLinkSpec, timeout_s: float = 60.0) -> subprocess.Popen[bytes]:
    """Start the SuperLink and wait until its port accepts connections; RuntimeError (with the log's
    tail) when it exits or does not come up."""
    spec.state_dir.mkdir(parents=True, exist_ok=True)
    process = spawn(
        superlink_command(spec), flower_env(spec.home), spec.log, cwd=spec.state_dir, owner=spec.state_dir
    )
    if not wait_for_port(LOOPBACK, spec.port, timeout_s, process):
        tail = spec.log.read_text(errors="replace")[-2000:] if spec.log.exists() else ""
        if process.poll() is None:
            stop_tree(process)
        raise RuntimeError(f"SuperLink did not start on {spec.address}; see {spec.log}\n{tail}")
    return process
