"""Process helpers shared by coordinator and site: whole trees stopped, sockets found, node config quoted,
and the pre-warmed executor's module hygiene."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.supernode import node_config_arg
from client.warm_executor import forget_first_party, prewarm
from strategies.protocol.processes import descendants, flower_env, listening_addresses, pid_alive, stop_tree
from visionfm_core.errors import ConfigError

# A parent that starts a grandchild in its own session (as Flower starts SuperExec) and waits.
TREE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(60)
"""


def test_stop_tree_reaches_descendants_in_other_sessions() -> None:
    parent = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    grandchild = int(parent.stdout.readline())
    assert grandchild in descendants(parent.pid)
    stop_tree(parent, grace_s=2.0)
    deadline = time.monotonic() + 5
    while pid_alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(grandchild)
    assert parent.returncode is not None


def test_listening_addresses_of_this_process() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert ("127.0.0.1", port) in listening_addresses(__import__("os").getpid())


def test_flower_env_keeps_flower_private(tmp_path: Path) -> None:
    env = flower_env(tmp_path / "home", {"EXTRA": "1"})
    assert env["FLWR_HOME"] == str(tmp_path / "home") and env["EXTRA"] == "1"
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1" and env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)


def test_node_config_argument_is_what_flower_parses() -> None:
    from flwr.common.config import parse_config_args

    values: dict[str, str | int | float | bool] = {
        "data-path": "/data/site one/images",
        "modalities": "oct,fundus",
        "gpu": 1,
        "warm": True,
    }
    assert parse_config_args([node_config_arg(values)]) == values
    with pytest.raises(ConfigError):
        node_config_arg({"data-path": '/data/"quoted"'})


def test_first_party_modules_are_forgotten_third_party_kept() -> None:
    import certs.keys  # noqa: F401 - make sure a first-party module is loaded

    took = prewarm(["json", "no_such_module_xyz"])
    assert set(took) == {"json"}
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in ("certs", "client")}
    try:
        assert forget_first_party(("certs", "client")) >= 2
        assert "certs.keys" not in sys.modules and "json" in sys.modules
    finally:
        sys.modules.update(saved)


def test_supernode_launcher_caps_flowers_idle_poll_and_keeps_the_program_name(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import inspect
    from types import SimpleNamespace

    from flwr.supernode import start_client_internal

    from client.supernode import SuperNodeSpec, supernode_command
    from client.supernode_poll import cap_idle_poll

    # Flower's loop sleeps 3 s through its module-level `time` when a pull finds nothing: what is capped.
    assert "time.sleep(3)" in inspect.getsource(start_client_internal)
    monkeypatch.setattr(start_client_internal, "time", time)  # restored after the test
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    cap_idle_poll(0.25)
    start_client_internal.time.sleep(3)
    start_client_internal.time.sleep(0.1)
    assert slept == [0.25, 0.1]  # capped, never lengthened
    assert start_client_internal.time.monotonic is time.monotonic  # the rest is the real module

    # The site's SuperNode runs through the launcher; `flower-supernode` stays in its command line.
    spec = SuperNodeSpec(bundle=SimpleNamespace(node_key=tmp_path / "node.key"),  # type: ignore[arg-type]
                         loopback=SimpleNamespace(ca_cert=tmp_path / "ca.crt"),  # type: ignore[arg-type]
                         uplink_port=1, runtime_port=2, node_config={}, work_dir=tmp_path, idle_poll_s=0.5)
    command = supernode_command(spec)
    assert command[1:6] == ["-m", "client.supernode_poll", "--idle-poll", "0.5", "flower-supernode"]
    assert command[6:8] == ["--superlink", "127.0.0.1:1"]
