"""`visionfm simulate --ray-address`: the quick scenario on a Ray cluster someone else started, here two
Ray nodes on loopback (`ray start --head` and `ray start --address`, each with its own temp dir), each
offering one CPU, so that with one CPU per site the sites run on both nodes. The same run checks the
per-round site sampling and the memory numbers in the metrics and report."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _ray_node(temp_dir: str, *args: str) -> subprocess.Popen[bytes]:
    """One Ray node in the foreground (`--block`): stopping this process stops the node's processes."""
    command = [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
               f"--temp-dir={temp_dir}", "--disable-usage-stats", *args]
    log = open(Path(temp_dir) / "ray-start.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()  # `ray start --block` stops the node's raylet, GCS and workers on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _nodes_alive(address: str, expected: int, limit: float = 240.0) -> None:
    """Wait until the cluster reports `expected` live nodes (`ray status` asks the head's GCS)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        status = subprocess.run([RAY, "status", f"--address={address}"], capture_output=True, text=True)
        if status.returncode == 0 and status.stdout.count("node_") >= expected:
            return
        time.sleep(2.0)
    raise AssertionError(f"the Ray cluster at {address} did not report {expected} nodes: {status.stdout}")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[tuple[str, list[str]]]:
    # Short temp dirs: Ray's socket paths must stay under ~107 bytes.
    head_dir, worker_dir = tempfile.mkdtemp(prefix="vfm-h-"), tempfile.mkdtemp(prefix="vfm-w-")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env_note = os.environ.get("RAY_USAGE_STATS_ENABLED")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    head = _ray_node(head_dir, "--head", f"--port={port}", "--include-dashboard=false",
                     f"--ray-client-server-port={_free_port()}", f"--node-manager-port={_free_port()}",
                     f"--object-manager-port={_free_port()}")
    nodes = [head]
    try:
        _nodes_alive(address, 1)
        nodes.append(_ray_node(worker_dir, f"--address={address}", f"--node-manager-port={_free_port()}",
                               f"--object-manager-port={_free_port()}"))
        _nodes_alive(address, 2)
        yield address, [head_dir, worker_dir]
    finally:
        for proc in reversed(nodes):
            _stop(proc)
        if env_note is None:
            os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
        for folder in (head_dir, worker_dir):
            shutil.rmtree(folder, ignore_errors=True)


def _actor_logs(temp_dir: str) -> list[Path]:
    """Worker logs of Flower's ClientApp actors that ran on the node with this temp dir."""
    logs = Path(temp_dir) / "session_latest" / "logs"
    return [p for p in logs.glob("worker-*.err") if "ClientAppActor" in p.read_text(errors="ignore")]


def test_the_quick_scenario_runs_on_both_nodes_of_a_ray_cluster(ray_cluster: tuple[str, list[str]],
                                                                tmp_path: Path) -> None:
    address, temp_dirs = ray_cluster
    out = tmp_path / "run"
    command = [sys.executable, "-m", "simulations.cli", "simulate", "--scenario", "quick", "--out", str(out),
               "--ray-address", address, "--rounds", "2", "--fraction-train", "0.6", "--seed", "3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((out / "metrics.json").read_text())
    # Sites ran on both nodes of the cluster: each node's temp dir holds a ClientApp actor's worker log.
    assert all(_actor_logs(d) for d in temp_dirs), "expected ClientApp actors on both Ray nodes"
    # Sampling: 2 of the 3 sites train each round, seeded, and reported per round.
    sampling = {r["round"]: r for r in rows if r["phase"] == "sampling-train"}
    assert sorted(sampling) == [1, 2]
    for round_, row in sampling.items():
        assert (row["connected"], row["sampled"], row["replied"], row["stragglers"]) == (3, 2, 2, 0)
        trained = {r["site"] for r in rows if r["phase"] == "train" and r["round"] == round_}
        assert len(trained) == 2
    # Memory: the coordinator every round, and each site that trained.
    memory = [r for r in rows if r["phase"] == "memory"]
    assert {r["round"] for r in memory if r["site"] == "coordinator"} == {1, 2}
    assert all(r["rss_mb"] > 0 and r["peak_rss_mb"] >= r["rss_mb"] * 0.5 for r in memory)
    assert len([r for r in memory if r["site"] != "coordinator"]) == 4
    report = (out / "report.md").read_text()
    assert "## Sites asked per round" in report and "## Memory per round (MB)" in report
