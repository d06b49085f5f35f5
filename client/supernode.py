"""The site's Flower SuperNode and its executor, as processes with a private environment.

The SuperNode's Runtime API listens on 127.0.0.1, where any local process could ask it for the
site's training task. It therefore always runs with `--isolation process` and a per-start
SuperExec secret (a 0600 file in the site's private TLS folder): only an executor that signs its
task requests with that secret (the pre-warmed executor, or Flower's own `flower-superexec` with
--cold) is handed tasks.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from certs.bundle import HospitalBundle
from certs.keys import write_private
from certs.loopback import LoopbackTLS
from client.supernode_poll import DEFAULT_IDLE_POLL_S
from strategies.protocol.processes import flower_env, flower_script, spawn
from visionfm_core.errors import ConfigError

NodeValue = str | int | float | bool


def node_config_arg(values: Mapping[str, NodeValue]) -> str:
    """Flower's `--node-config` string: space-separated key=value, strings double-quoted (TOML)."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            rendered = "true" if value else "false"
        elif isinstance(value, (int, float)):
            rendered = repr(value)
        else:
            if '"' in value or "'" in value or "\\" in value:
                raise ConfigError(key, "node-config strings cannot contain quotes or backslashes")
            rendered = f'"{value}"'
        parts.append(f"{key}={rendered}")
    return " ".join(parts)


@dataclass(frozen=True)
class SuperNodeSpec:
    """Everything one SuperNode of this site needs."""

    bundle: HospitalBundle
    loopback: LoopbackTLS
    uplink_port: int
    runtime_port: int
    node_config: Mapping[str, NodeValue]
    work_dir: Path
    warm: bool = True
    gpu: int | None = None
    # The per-start SuperExec secret (see `write_superexec_secret`); None for stock Flower behaviour.
    superexec_secret: Path | None = None
    devices: int = 1  # a multi-device site sees GPUs gpu .. gpu + devices - 1
    # Seconds between the SuperNode's pulls that find no message (Flower's own: 3; see client/supernode_poll.py).
    idle_poll_s: float = DEFAULT_IDLE_POLL_S

    @property
    def home(self) -> Path:
        return self.work_dir / "flwr-home"

    def env(self) -> dict[str, str]:
        extra = {}
        if self.gpu is not None:
            # Only the chosen GPU is visible to the SuperNode and its ClientApps; -1 hides all (CPU).
            visible = ",".join(str(self.gpu + i) for i in range(max(self.devices, 1)))
            extra["CUDA_VISIBLE_DEVICES"] = "" if self.gpu < 0 else visible
        return flower_env(self.home, extra)


def supernode_command(spec: SuperNodeSpec) -> list[str]:
    """Flower's SuperNode, through the launcher that shortens its idle poll (client/supernode_poll.py)."""
    return [
        sys.executable,
        "-m",
        "client.supernode_poll",
        "--idle-poll",
        repr(spec.idle_poll_s),
        "flower-supernode",
        "--superlink",
        f"127.0.0.1:{spec.uplink_port}",
        "--root-certificates",
        str(spec.loopback.ca_cert),
        "--auth-supernode-private-key",
        str(spec.bundle.node_key),
        "--port",
        str(spec.runtime_port),
        "--isolation",
        "process" if spec.warm or spec.superexec_secret is not None else "subprocess",
        "--node-config",
        node_config_arg(spec.node_config),
        *(["--superexec-auth-secret-file", str(spec.superexec_secret)] if spec.superexec_secret else []),
    ]


def write_superexec_secret(folder: Path) -> Path:
    """A fresh random SuperExec secret in `folder` (0600; the folder should be 0700)."""
    return write_private(folder / "superexec.secret", secrets.token_bytes(32))


def start_supernode(spec: SuperNodeSpec) -> subprocess.Popen[bytes]:
    return spawn(
        supernode_command(spec),
        spec.env(),
        spec.work_dir / "logs" / "supernode.log",
        cwd=spec.work_dir,
        owner=spec.work_dir,
    )


def deactivate_node(spec: SuperNodeSpec, node_id: int) -> bool:
    """Tell the SuperLink that this site's previous SuperNode (killed before it could say goodbye) is gone.

    Otherwise its activation stays valid until the heartbeat expires and the SuperLink refuses the new
    SuperNode's activation meanwhile. The request goes through the uplink, signed with the node key.
    """
    import httpx
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest  # type: ignore[attr-defined]
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.protobuf.client import ProtobufClientInterceptor
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    key = load_ssh_private_key(spec.bundle.node_key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    interceptors: list[ProtobufClientInterceptor] = [
        RuntimeVersionHttpInterceptor(component_name="SuperNode"),
        NodeAuthHttpInterceptor(key, key.public_key()),
    ]
    try:
        with FleetHttpClient.from_server_address(
            f"127.0.0.1:{spec.uplink_port}", False, str(spec.loopback.ca_cert), interceptors
        ) as client:
            client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
    except (httpx.HTTPError, ValueError):
        return False
    return True


def executor_command(spec: SuperNodeSpec) -> list[str]:
    """The pre-warmed executor (warm), or Flower's own SuperExec (cold: a fresh process per message)."""
    address = f"127.0.0.1:{spec.runtime_port}"
    secret = ["--superexec-auth-secret-file", str(spec.superexec_secret)] if spec.superexec_secret else []
    if spec.warm:
        return [sys.executable, "-m", "client.warm_executor", "--runtime-api-address", address, *secret]
    return [flower_script("flower-superexec"), "--runtime-api-address", address, "--insecure", *secret]


def start_warm_executor(spec: SuperNodeSpec) -> subprocess.Popen[bytes]:
    """Start the executor that runs the SuperNode's ClientApp tasks (see `executor_command`)."""
    return spawn(
        executor_command(spec),
        spec.env(),
        spec.work_dir / "logs" / "executor.log",
        cwd=spec.work_dir,
        owner=spec.work_dir,
    )
