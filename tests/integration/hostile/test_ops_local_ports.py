"""Hostile replay: other processes on a hospital machine. The uplink's loopback port (which forwards
with the hospital's identity) and the SuperNode's Runtime API (which hands out the site's training
task) must serve only the site's own processes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from certs.tls import client_context
from strategies.protocol.processes import listening_addresses
from tests.integration.deployment.conftest import (
    REPO,
    CoordinatorHandle,
    Federation,
    Processes,
    join_site,
    online_nodes,
    site_data,
    wait_until,
)
from tests.integration.hostile._ops_support import (  # noqa: F401
    coordinator_fixture,
    federation_fixture,
    processes_fixture,
    processes_named,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

# A local process asking the SuperNode for the site's training task, as an executor does (no retries:
# Flower's own retry logic would turn the answer into a SIGINT). With argv[2], it signs with that secret.
FOREIGN_EXECUTOR = """
import sys
import httpx
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient
interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
if len(sys.argv) > 2:
    secret = open(sys.argv[2], "rb").read()
    interceptors.append(SuperExecAuthHttpInterceptor(
        master_secret=secret, protected_methods={"/flwr.proto.Runtime/AcquireTask"}))
client = RuntimeHttpClient.from_server_address(
    server_address=sys.argv[1], insecure=True, root_certificates=None, interceptors=interceptors)
try:
    response = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
    print("ANSWERED", "task" if response.HasField("task") else "no task")
except httpx.HTTPStatusError as exc:
    print("REFUSED", exc.response.status_code, exc.response.text[:200])
"""


def test_local_processes_cannot_use_the_uplink_or_take_the_sites_task(
    processes: Processes, federation: Federation, coordinator: CoordinatorHandle, tmp_path: Path
) -> None:
    (data,) = site_data(tmp_path / "data", count=1)
    work = tmp_path / "site-a"
    join = join_site(processes, federation.bundle("hospital-a"), data, work)  # warm executor (the default)
    wait_until(lambda: "hospital-a" in online_nodes(coordinator) or join.poll() is not None, 240, "site a online")
    assert join.poll() is None, (tmp_path / "site-a.out").read_text()

    # 1. The uplink: a process of the same machine that is not the site's (this test) gets nothing.
    (uplink_port,) = [port for _, port in listening_addresses(join.pid)]
    loopback_ca = work / "tls" / "loopback-ca.crt"
    with httpx.Client(verify=client_context(loopback_ca), timeout=10) as client, pytest.raises(httpx.HTTPError):
        client.get(f"https://127.0.0.1:{uplink_port}/v1/gateway/whoami")
    uplink_log = (tmp_path / "site-a.out").read_text()
    assert "refused a local connection from a process that is not this site's own" in uplink_log

    # 2. The Runtime API: a process without the per-start secret asks for the site's task.
    (supernode,) = processes_named(join.pid, "flower-supernode")
    runtime_ports = [port for _, port in listening_addresses(supernode)]
    assert runtime_ports
    def ask(*secret: str) -> str:
        answer = subprocess.run(
            [sys.executable, "-c", FOREIGN_EXECUTOR, f"127.0.0.1:{runtime_ports[0]}", *secret],
            capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
        )
        return (answer.stdout + answer.stderr[-300:]).strip()

    without, signed = ask(), ask(str(work / "tls" / "superexec.secret"))
    print(f"AcquireTask without the secret: {without}\nwith the site's secret: {signed}")
    assert without.startswith("REFUSED 401") and "authentication failed" in without.lower(), without
    assert signed.startswith("ANSWERED"), signed  # the difference is the per-start secret, nothing else
    assert oct((work / "tls").stat().st_mode & 0o777) == "0o700"
    assert oct((work / "tls" / "superexec.secret").stat().st_mode & 0o777) == "0o600"

    # The site's own executor still polls with the secret, and the site stays online.
    time.sleep(2.0)
    executor_log = (work / "logs" / "executor.log").read_text()
    assert "authentication failed" not in executor_log
    assert processes_named(join.pid, "client.warm_executor") and "hospital-a" in online_nodes(coordinator)
