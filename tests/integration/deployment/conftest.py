"""Real deployments on 127.0.0.1: certificates in a temporary folder, the coordinator and the sites as
the CLI processes hospitals and coordinators run, every process tree stopped at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import simulations
from certs.provision import issue
from certs.store import CertStore
from server.ops.coordinator import CoordinatorState
from strategies.protocol.processes import free_port, stop_tree, wait_for_port

HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")
FIXTURE_APP = Path(__file__).parent / "fixture_app"
REPO = Path(__file__).resolve().parents[3]


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.3) -> object:
    """Poll until `predicate()` is truthy; fail the test naming `what` on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")


@dataclass
class Processes:
    """Every process a test started; all trees are stopped at teardown."""

    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def launch(self, args: list[str], log: Path, env: dict[str, str] | None = None,
               cwd: Path = REPO) -> subprocess.Popen[bytes]:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as handle:
            process = subprocess.Popen(
                [sys.executable, *args],
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        """Stop every tree side by side: their grace periods overlap instead of adding up at teardown."""
        if not self.started:
            return
        with ThreadPoolExecutor(max_workers=len(self.started)) as pool:
            list(pool.map(partial(stop_tree, grace_s=5.0), reversed(self.started)))


@pytest.fixture
def processes() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.stop_all()


@dataclass
class Federation:
    """A provisioned federation in a temporary folder."""

    root: Path
    store: CertStore
    gateway_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gateway_port}"

    def bundle(self, hospital: str) -> Path:
        return self.store.bundle_dir(hospital)


def write_participants(path: Path, port: int, hospitals: tuple[str, ...] = HOSPITALS, name: str = "test-fed") -> Path:
    lines = [f'[federation]\nname = "{name}"\n', f'[coordinator]\naddress = "127.0.0.1:{port}"\n']
    lines += [f'[[hospital]]\nname = "{h}"\n' for h in hospitals]
    path.write_text("\n".join(lines))
    return path


@pytest.fixture
def federation(tmp_path: Path) -> Federation:
    port = free_port()
    participants = write_participants(tmp_path / "participants.toml", port)
    issue(participants, tmp_path / "pki")
    return Federation(tmp_path, CertStore(tmp_path / "pki"), port)


@dataclass
class CoordinatorHandle:
    process: subprocess.Popen[bytes]
    state_dir: Path
    log: Path

    def state(self) -> CoordinatorState:
        state = CoordinatorState.load(self.state_dir)
        assert state is not None
        return state

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run `visionfm-server ARGS --state STATE` (as the coordinator's operator would)."""
        return subprocess.run(
            [sys.executable, "-m", "server.cli", *args, "--state", str(self.state_dir)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            check=False,
        )


def start_coordinator(processes: Processes, federation: Federation, state_dir: Path, *extra: str) -> CoordinatorHandle:
    """`visionfm-server start` (with `extra` options) on the federation; returns once its gateway listens."""
    log = state_dir.parent / f"{state_dir.name}.out"
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "coordinator.json").unlink(missing_ok=True)
    process = processes.launch(
        ["-m", "server.cli", "start", "--certs", str(federation.store.root), "--state", str(state_dir), *extra], log
    )
    wait_until(
        lambda: (state_dir / "coordinator.json").exists() or process.poll() is not None,
        90,
        "the coordinator to start",
    )
    assert process.poll() is None, log.read_text()
    assert wait_for_port("127.0.0.1", federation.gateway_port, 10)
    return CoordinatorHandle(process, state_dir, log)


@pytest.fixture
def coordinator(processes: Processes, federation: Federation) -> CoordinatorHandle:
    return start_coordinator(processes, federation, federation.root / "coordinator")


@pytest.fixture(scope="module")
def shared_federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    """One federation for a whole module whose tests do not change what others rely on."""
    root = tmp_path_factory.mktemp("federation")
    port = free_port()
    issue(write_participants(root / "participants.toml", port), root / "pki")
    return Federation(root, CertStore(root / "pki"), port)


@pytest.fixture(scope="module")
def shared_coordinator(shared_federation: Federation) -> Iterator[CoordinatorHandle]:
    procs = Processes()
    try:
        yield start_coordinator(procs, shared_federation, shared_federation.root / "coordinator")
    finally:
        procs.stop_all()


def join_site(processes: Processes, bundle: Path, data: Path, work: Path, *extra: str) -> subprocess.Popen[bytes]:
    """Start `visionfm-client join` for one site."""
    return processes.launch(
        [
            "-m",
            "client.cli",
            "join",
            "--bundle",
            str(bundle),
            "--data",
            str(data),
            "--modalities",
            "fundus",
            "--work",
            str(work),
            "--gpu",
            "-1",
            *extra,
        ],
        work.parent / f"{work.name}.out",
    )


def online_nodes(coordinator: CoordinatorHandle) -> set[str]:
    from server.ops.control import ControlPlane

    state = coordinator.state()
    with ControlPlane(state.superlink_port, CertStore(Path(state.certs_dir))) as control:
        return {n.name for n in control.nodes() if n.status == "online"}


def site_data(folder: Path, count: int = 3, train: int = 48, val: int = 16) -> list[Path]:
    """Disjoint slices of the bundled RetinaMNIST as one small .npz per site."""
    source = Path(simulations.__file__).parent / "data" / "retinamnist" / "retinamnist.npz"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with np.load(source) as data:
        for i in range(count):
            tr = slice(i * train, (i + 1) * train)
            va = slice(i * val, (i + 1) * val)
            path = folder / f"site-{i}.npz"
            np.savez(
                path,
                train_images=data["train_images"][tr],
                train_labels=data["train_labels"][tr],
                val_images=data["val_images"][va],
                val_labels=data["val_labels"][va],
                test_images=data["test_images"][va],
                test_labels=data["test_labels"][va],
            )
            paths.append(path)
    return paths


def audit_entries(work: Path, event: str) -> list[dict[str, Any]]:
    path = work / "audit.jsonl"
    if not path.exists():
        return []
    return [e for e in map(json.loads, path.read_text().splitlines()) if e.get("event") == event]


def write_deploy_job(
    folder: Path,
    name: str,
    rounds: int,
    min_sites: int,
    round_timeout: float,
    eval_every: int = 1,
    privacy: dict[str, float] | None = None,
    extra_run_config: str = "",
) -> Path:
    """A job for the real app (the default deployment app): a nano ViT at 32 px, one local step; with
    `privacy` (privacy.<key> values), DP-SGD (every site then needs its own budget)."""
    job = folder / f"{name}.toml"
    dp = "" if privacy is None else "[privacy]\n" + "".join(f"{k} = {v}\n" for k, v in privacy.items()) + "\n"
    run_config = "dp = true\n" if privacy is not None else ""
    job.write_text(
        f'[job]\nname = "{name}"\nmodalities = ["fundus"]\nnum-rounds = {rounds}\nmin-sites = {min_sites}\n'
        f"round-timeout = {round_timeout}\n\n{dp}[run-config]\n{run_config}"
        'local-steps = 1\nbatch-size = 8\narch = "nano"\nimage-size = 32\npatch-size = 8\nknn-k = 3\n'
        f"client-threads = 1\neval-every = {eval_every}\n{extra_run_config}"
        '"ssl.out-dim" = 64\n"ssl.head-hidden-dim" = 32\n"ssl.head-bottleneck-dim" = 16\n"ssl.local-crops" = 0\n'
    )
    return job
