"""The control plane is closed: only the coordinator's host can start or stop runs.

In open-source Flower the Control API (`flwr run`, `flwr stop`, node registration) shares the SuperLink's
port and has no authentication. Here a hospital, with its full credentials or with none, tries to start
a run and fails; the very same request, sent by the coordinator on loopback, starts one."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import subprocess
from pathlib import Path

import httpx
import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.common.serde import fab_to_proto, user_config_to_proto
from flwr.proto.control_pb2 import StartRunRequest  # type: ignore[attr-defined]
from flwr.supercore.fab import Fab
from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

from certs.keys import load_private_key
from certs.tls import client_context
from server.ops.control import ControlPlane
from strategies.protocol.processes import flower_env, flower_script, listening_addresses
from tests.integration.deployment.conftest import FIXTURE_APP, CoordinatorHandle, Federation

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PROTOBUF = "application/protobuf"


def start_run_body() -> bytes:
    """A genuine StartRun request for the fixture app, exactly what `flwr run` sends."""
    fab_bytes = build_fab_from_disk(FIXTURE_APP)
    fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
    request = StartRunRequest(fab=fab_to_proto(fab), override_config=user_config_to_proto({}))
    return bytes(request.SerializeToString())


def node_signed_headers(federation: Federation, hospital: str) -> dict[str, str]:
    """The headers a hospital's SuperNode signs every Fleet request with (its registered node key)."""
    key = load_private_key(federation.store.hospital(hospital).node_key)
    timestamp = dt.datetime.now(dt.timezone.utc).isoformat()
    return {
        "content-type": PROTOBUF,
        "flwr-public-key": base64.b64encode(public_key_to_bytes(key.public_key())).decode(),
        "flwr-timestamp": timestamp,
        "flwr-signature": base64.b64encode(sign_message(key, timestamp.encode())).decode(),
    }


def runs(coordinator: CoordinatorHandle, federation: Federation) -> list[int]:
    with ControlPlane(coordinator.state().superlink_port, federation.store) as control:
        return [r.run_id for r in control.runs()]


def test_only_the_coordinator_can_start_runs(
    coordinator: CoordinatorHandle, federation: Federation, tmp_path: Path
) -> None:
    state = coordinator.state()
    # The SuperLink (Control, Runtime and Fleet APIs on one port) listens on loopback only.
    addresses = listening_addresses(state.superlink_pid)
    assert addresses and all(host == "127.0.0.1" for host, _ in addresses), addresses

    body = start_run_body()
    bundle = federation.bundle("hospital-a")
    hospital_tls = client_context(bundle / "ca.crt", bundle / "client.crt", bundle / "client.key")
    refused_routes = [
        "/v1/control/start-run",
        "/v1/control/stop-run",
        "/v1/control/list-runs",
        "/v1/control/register-node",
        "/v1/runtime/pull-task-input",
        "/v1/fleet/register-node",  # self-registration: keys are registered by the coordinator only
    ]
    with httpx.Client(base_url=f"https://{federation.address}", verify=hospital_tls, timeout=20) as client:
        for route in refused_routes:
            response = client.post(route, content=body, headers=node_signed_headers(federation, "hospital-a"))
            assert response.status_code == 403, (route, response.status_code, response.text)
            assert "not exposed" in response.json()["detail"]

    # No credentials at all: the gateway does not even complete TLS with a client without a certificate.
    with (
        pytest.raises(httpx.HTTPError),
        httpx.Client(verify=client_context(federation.store.ca_cert), timeout=20) as anonymous,
    ):
        anonymous.post(
            f"https://{federation.address}/v1/control/start-run", content=body, headers={"content-type": PROTOBUF}
        )

    # Stock `flwr run` aimed at the coordinator's public address, trusting the federation CA.
    home = tmp_path / "hospital-cli"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "coord"\n[superlink.coord]\naddress = "{federation.address}"\n'
        f'root-certificates = "{federation.store.ca_cert}"\n'
    )
    result = subprocess.run(
        [flower_script("flwr"), "run", str(FIXTURE_APP), "coord", "--format", "json"],
        env=flower_env(home),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    reply = json.loads(result.stdout[result.stdout.index("{") :])  # `flwr --format json` exits 0 either way
    assert reply["success"] is False, result.stdout
    assert runs(coordinator, federation) == []

    # Positive control: the same request from the coordinator's host (loopback SuperLink) starts a run.
    coordinator_tls = client_context(federation.store.ca_cert)
    with httpx.Client(verify=coordinator_tls, timeout=60) as local:
        response = local.post(
            f"https://127.0.0.1:{state.superlink_port}/v1/control/start-run",
            content=body,
            headers={"content-type": PROTOBUF, "accept": PROTOBUF},
        )
    assert response.status_code == 200, response.text
    started = runs(coordinator, federation)
    assert len(started) == 1
    with ControlPlane(state.superlink_port, federation.store) as control:
        control.stop_run(started[0])
