"""Runs on a running coordinator: submit a job, follow it, resume it, stop it, export its encoders.

A job's outputs live in `<state>/runs/<job name>/` (checkpoints, metrics, report, final encoders).
Resuming submits the same job again with the same folder: the ServerApp restarts after the last
fully written round checkpoint, so a round the dead coordinator had started is run again from the
saved global model and nothing is aggregated twice.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from certs.store import CertStore
from server.ops.control import ControlPlane, RunInfo
from server.ops.coordinator import CoordinatorState, running_state
from server.ops.jobs import Job, check_against_app, toml_overrides
from server.ops.superlink import LOOPBACK
from strategies.protocol.processes import flower_env, flower_script
from visionfm_core.errors import ConfigError

CONNECTION = "coordinator"
ROUND_MARKER = "round.json"


@dataclass
class RunRecord:
    """One submission of a job."""

    job: str
    run_id: int
    out_dir: str
    submitted_at: float
    resumed_from: int | None = None


def runs_dir(state_dir: Path) -> Path:
    return state_dir / "runs"


def job_dir(state_dir: Path, name: str) -> Path:
    return runs_dir(state_dir) / name


class RunRegistry:
    """`<state>/runs.json`: every submission, so commands can refer to a job by name."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "runs.json"

    def records(self) -> list[RunRecord]:
        if not self.path.exists():
            return []
        return [RunRecord(**row) for row in json.loads(self.path.read_text())]

    def add(self, record: RunRecord) -> None:
        rows = [asdict(r) for r in self.records()] + [asdict(record)]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=2))
        tmp.replace(self.path)

    def find(self, ref: str) -> RunRecord:
        """The latest submission of job `ref`, or the submission with run id `ref`."""
        records = self.records()
        for record in reversed(records):
            if record.job == ref or str(record.run_id) == ref:
                return record
        raise ConfigError("run", f"no run or job called {ref!r} on this coordinator")


def cli_home(state_dir: Path, state: CoordinatorState) -> Path:
    """A FLWR_HOME whose config.toml names the loopback SuperLink as connection 'coordinator'."""
    home = state_dir / "cli-home"
    home.mkdir(parents=True, exist_ok=True)
    ca = CertStore(Path(state.certs_dir)).ca_cert
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{LOOPBACK}:{state.superlink_port}"\nroot-certificates = {json.dumps(str(ca))}\n'
    )
    return home


def completed_rounds(out_dir: Path) -> list[int]:
    """Round numbers with a complete checkpoint (the marker file is written last)."""
    rounds = []
    for folder in (out_dir / "checkpoints").glob("round-*"):
        if (folder / ROUND_MARKER).is_file():
            rounds.append(int(folder.name.split("-")[1]))
    return sorted(rounds)


def submit(state_dir: Path, job: Job, resume: bool = False) -> RunRecord:
    """Start `job` on the running coordinator (or resume it); returns the submission record. A job for the
    deployment app has its values checked first (a ConfigError names the key)."""
    # Imported here: the app's config defaults pull in torch, which `status`, `logs` and `export` never need.
    from server.ops.deploy_app import check_run_config, write_deployment_app

    if job.app is None:
        check_run_config(dict(job.overrides))
    state = running_state(state_dir)
    out_dir = job_dir(state_dir, job.name).resolve()
    done = completed_rounds(out_dir)
    resumed_from = max(done) if done else None
    if done and not resume:
        raise ConfigError(
            "job.name",
            f"{out_dir} already holds rounds up to {max(done)}: pass --resume to "
            "continue that run, or give the job another name",
        )
    app = job.app if job.app is not None else write_deployment_app(state_dir / "app")
    overrides: dict[str, Any] = {**job.overrides, "out-dir": str(out_dir)}
    if resume:
        overrides["resume"] = True  # the ServerApp restarts after the folder's last complete round
    check_against_app(app, overrides)
    if resume:
        _stop_stale_runs(state_dir, state, job.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    override_file = out_dir / f"submitted-{int(time.time())}.toml"
    override_file.write_text(toml_overrides(overrides))
    env = flower_env(cli_home(state_dir, state))
    command = [
        flower_script("flwr"),
        "run",
        str(app),
        CONNECTION,
        "--run-config",
        str(override_file),
        "--format",
        "json",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    run_id = _run_id(result.stdout)
    if result.returncode != 0 or run_id is None:
        detail = (result.stdout + result.stderr).strip()[-2000:]
        raise RuntimeError(f"the SuperLink did not accept the run:\n{detail}")
    record = RunRecord(job.name, run_id, str(out_dir), time.time(), resumed_from if resume else None)
    RunRegistry(state_dir).add(record)
    return record


def _run_id(stdout: str) -> int | None:
    start = stdout.find("{")
    if start < 0:
        return None
    try:
        payload = json.loads(stdout[start:])
    except json.JSONDecodeError:
        return None
    value = payload.get("run-id") if payload.get("success") else None
    return int(value) if value is not None else None


def _stop_stale_runs(state_dir: Path, state: CoordinatorState, job_name: str) -> None:
    """A run of this job the SuperLink still lists as active (its ServerApp died with the coordinator)
    is stopped, so only one ServerApp ever writes into the job's folder."""
    ids = {r.run_id for r in RunRegistry(state_dir).records() if r.job == job_name}
    if not ids:
        return
    with ControlPlane(state.superlink_port, CertStore(Path(state.certs_dir))) as control:
        for run in control.runs():
            if run.run_id in ids and run.status != "finished":
                control.stop_run(run.run_id)


def run_info(state_dir: Path, run_id: int) -> RunInfo | None:
    state = running_state(state_dir)
    with ControlPlane(state.superlink_port, CertStore(Path(state.certs_dir))) as control:
        runs = control.runs(run_id)
    return runs[0] if runs else None


def wait_for_run(
    state_dir: Path,
    record: RunRecord,
    on_round: Callable[[int, list[dict[str, Any]]], None] | None = None,
    poll_s: float = 2.0,
    timeout_s: float | None = None,
) -> RunInfo:
    """Block until the run finishes; `on_round(round, metrics rows)` for each newly checkpointed round."""
    out_dir = Path(record.out_dir)
    reported = set(completed_rounds(out_dir))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        info = run_info(state_dir, record.run_id)
        for server_round in completed_rounds(out_dir):
            if server_round not in reported:
                reported.add(server_round)
                if on_round is not None:
                    on_round(server_round, metrics_rows(out_dir, server_round))
        if info is not None and info.status == "finished":
            return info
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"run {record.run_id} still {info.status if info else 'unknown'}")
        time.sleep(poll_s)


def metrics_rows(out_dir: Path, server_round: int) -> list[dict[str, Any]]:
    path = out_dir / "metrics.json"
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError:
        return []
    return [r for r in rows if int(r.get("round", -1)) == server_round]


def failure_reason(out_dir: Path) -> str | None:
    """Why the run in `out_dir` stopped as failed (its ServerApp wrote `failure.json`), if it did."""
    path = out_dir / "failure.json"
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    last = payload.get("last-good-round")
    kept = f"; last good checkpoint: round {last}" if last is not None else ""
    return f"{payload.get('reason', 'unknown reason')}{kept}"


def _refuse_non_finite(path: Path) -> None:
    """An encoder with NaN or Inf weights is never exported (it would poison every model built on it)."""
    from visionfm_core.models.checkpoint import load_encoder

    state, _ = load_encoder(path)
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise ConfigError("run", f"{path.name} is not finite ({key} holds NaN or Inf): refusing to export it; "
                                     "export an earlier round with --round")


def export_encoders(out_dir: Path, dest: Path, server_round: int | None = None) -> list[Path]:
    """Copy the final encoders (or those of one checkpointed round) with their metadata to `dest`."""
    if server_round is None:
        source = out_dir / "encoders"
        if not source.is_dir():
            done = completed_rounds(out_dir)
            hint = f"; the latest complete round is {max(done)} (export it with --round)" if done else ""
            raise ConfigError("run", f"{out_dir} has no final encoders yet{hint}")
    else:
        source = out_dir / "checkpoints" / f"round-{server_round:04d}"
        if not (source / ROUND_MARKER).is_file():
            raise ConfigError("round", f"round {server_round} has no complete checkpoint in {out_dir}")
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(source.glob("*.safetensors")):
        if path.name.endswith(".head.safetensors"):
            continue  # SSL projection heads are training machinery, not part of the encoder
        _refuse_non_finite(path)
        target = dest / path.name
        shutil.copy2(path, target)
        copied.append(target)
    if not copied:
        raise ConfigError("run", f"no encoder files in {source}")
    if server_round is None:
        # The fine-tuned global task models, which `visionfm evaluate` and `visionfm predict` load.
        for path in sorted((out_dir / "finetuned").glob("*.task.safetensors")):
            _refuse_non_finite_tensors(path)
            target = dest / path.name
            shutil.copy2(path, target)
            copied.append(target)
    return copied


def _refuse_non_finite_tensors(path: Path) -> None:
    from safetensors.torch import load_file

    for key, tensor in load_file(str(path)).items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise ConfigError("run", f"{path.name} is not finite ({key} holds NaN or Inf): refusing to export it")
