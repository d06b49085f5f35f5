"""`visionfm-server`: the coordinator's command line (certificates, SuperLink, runs)."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from certs.cli import app as certs_app
from certs.errors import CertificateError
from visionfm_core.errors import ConfigError

app = typer.Typer(
    help="Coordinate a federation of hospitals: certificates, the SuperLink behind its gateway, runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold paths or keys
)
app.add_typer(certs_app, name="certs")
console = Console(soft_wrap=True)  # never wrap or cut a line: paths must stay whole
DEFAULT_STATE = Path("visionfm-coordinator")
# Every path option is made absolute here: the coordinator's processes run in other folders.
STATE_OPTION = typer.Option(DEFAULT_STATE, "--state", help="The coordinator's state folder.", resolve_path=True)


def _fail(message: object, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {escape(str(message))}")
    raise typer.Exit(code)


def _configure_logging(log_file: Path | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)


@app.command()
def start(
    certs: Path = typer.Option(
        ..., "--certs", help="The provisioning folder from `certs issue`.", resolve_path=True
    ),
    state: Path = STATE_OPTION,
    listen: str = typer.Option(
        "",
        "--listen",
        help="host:port for the gateway (default: the coordinator "
        "address of the participants file; use 0.0.0.0:PORT to listen everywhere).",
    ),
    superlink_port: int = typer.Option(
        0, "--superlink-port", help="Loopback port of the SuperLink (default: free)."
    ),
    dashboard: str = typer.Option(
        "127.0.0.1:0",
        "--dashboard",
        help="host:port of the read-only dashboard (HTTPS; operators' certificates from `certs operator` "
        "only); port 0 picks a free one, shown at start and by `status`; 'off' for none.",
    ),
    max_request_mb: int = typer.Option(
        32,
        "--max-request-mb",
        min=1,
        help="Largest request body a site may send, in MiB (Flower sends arrays in chunks of at most "
        "5 MiB; larger bodies are refused with 413 before they cost memory).",
    ),
    crl_check_seconds: float = typer.Option(
        60.0,
        "--crl-check-seconds",
        min=0.5,
        help="How often the running coordinator looks at its CRL; it re-signs the CRL (CA key online) "
        "15 days before it expires.",
    ),
) -> None:
    """Run the coordinator in the foreground until Ctrl-C / SIGTERM.

    The SuperLink listens on 127.0.0.1 only (its Control API, which starts runs, is unauthenticated in
    open-source Flower); hospitals reach the Fleet API through the mutual-TLS gateway on --listen. The
    dashboard (loopback by default) shows hospitals online, round progress and timings, metric plots per
    round and site, epsilon spent, bytes per round and recent rejections.
    """
    from server.ops.coordinator import run_coordinator
    from server.ops.dashboard.serve import dashboard_factory

    _configure_logging(state / "logs" / "coordinator.log")

    def ready(info: Any) -> None:
        console.print(
            f"[green]coordinator ready[/green]: gateway {info.gateway_host}:{info.gateway_port}, "
            f"SuperLink 127.0.0.1:{info.superlink_port}, state {state}"
            + (f", dashboard {info.dashboard_url}" if info.dashboard_url else "")
        )

    try:
        serve_dashboard = None if dashboard.lower() in ("", "off", "none") else dashboard_factory(dashboard)
        code = run_coordinator(
            certs, state, listen or None, superlink_port or None, on_ready=ready, dashboard=serve_dashboard,
            max_body_bytes=max_request_mb * 1024 * 1024, crl_check_s=crl_check_seconds,
        )
    except (ConfigError, CertificateError, RuntimeError) as exc:
        _fail(exc)
        return
    raise typer.Exit(code)


def _print_round(server_round: int, rows: list[dict[str, Any]], total: int | None = None) -> None:
    train = [r for r in rows if r.get("phase") == "train"]
    sites = sorted({str(r.get("site")) for r in train})
    losses = [float(r["loss"]) for r in train if isinstance(r.get("loss"), (int, float))]
    parts = [f"round {server_round}" + (f"/{total}" if total else "")]
    if train:
        parts.append(f"{len(sites)} site(s)")
    if losses and not all(math.isnan(x) for x in losses):
        parts.append(f"loss {sum(losses) / len(losses):.3f}")
    for r in rows:
        if r.get("phase") == "evaluate" and isinstance(r.get("knn_accuracy"), (int, float)):
            parts.append(f"{r.get('site')}/{r.get('modality')} k-NN {float(r['knn_accuracy']):.3f}")
    console.print(" · ".join(parts))


@app.command()
def run(
    job_file: Path = typer.Argument(
        ..., help="The job TOML (phases, modalities, rounds, strategy, ...).", resolve_path=True
    ),
    state: Path = STATE_OPTION,
    resume: bool = typer.Option(False, "--resume", help="Continue the job from its last complete round."),
    detach: bool = typer.Option(False, "--detach", help="Submit and return; follow with `status`/`logs`."),
    tracking: str = typer.Option(
        "", "--tracking", help="mlflow | tensorboard: log config, per-round metrics and final encoders "
        "(in the job's folder unless the job's run-config names a tracking-uri)."
    ),
) -> None:
    """Start a federation from a job file and follow it round by round until it finishes."""
    from server.ops.jobs import load_job
    from server.ops.runs import submit, wait_for_run

    try:
        job = load_job(job_file)
        if tracking:
            if tracking not in ("mlflow", "tensorboard"):
                raise ConfigError("--tracking", f"must be 'mlflow' or 'tensorboard', got {tracking!r}")
            job.overrides["tracking"] = tracking
        record = submit(state, job, resume=resume)
    except (ConfigError, RuntimeError) as exc:
        _fail(exc)
        return
    note = f" (resuming after round {record.resumed_from})" if record.resumed_from is not None else ""
    console.print(f"run {record.run_id} of job {job.name} started{note}; outputs in {record.out_dir}")
    if detach:
        return
    rounds = job.overrides.get("num-rounds")
    total = int(rounds) if isinstance(rounds, (int, float)) else None
    try:
        info = wait_for_run(state, record, on_round=lambda r, rows: _print_round(r, rows, total))
    except RuntimeError as exc:
        _fail(
            f"{exc}\nif the coordinator died, start it again and run "
            f"`visionfm-server run {job_file} --resume`",
            1,
        )
        return
    except KeyboardInterrupt:
        console.print("stopped following; the run continues (see `visionfm-server status`)")
        return
    report = Path(record.out_dir) / "report.md"
    if info.sub_status != "completed":
        from server.ops.runs import failure_reason

        reason = failure_reason(Path(record.out_dir)) or info.details or "see visionfm-server logs"
        _fail(f"run {record.run_id} {info.sub_status}: {reason}", 1)
    console.print(
        f"[green]run {record.run_id} completed[/green]" + (f"; report: {report}" if report.exists() else "")
    )


@app.command()
def status(state: Path = STATE_OPTION) -> None:
    """The coordinator, its hospitals (online or not) and its runs; exit code 1 when the coordinator
    is not running or its CRL or certificates have expired (warnings 14 days ahead)."""
    from certs.store import CertStore
    from certs.verify import coordinator_expiry
    from server.ops.control import ControlPlane
    from server.ops.coordinator import running_state
    from server.ops.runs import RunRegistry, completed_rounds

    try:
        info = running_state(state)
    except RuntimeError as exc:
        _fail(exc, 1)
        return
    console.print(
        f"coordinator pid {info.pid}: gateway {info.gateway_host}:{info.gateway_port}, "
        f"SuperLink 127.0.0.1:{info.superlink_port}"
        + (f", dashboard {info.dashboard_url}" if info.dashboard_url else "")
    )
    expiry = coordinator_expiry(info.certs_dir)
    for finding in expiry:
        colour = "red" if finding.level == "error" else "yellow"
        console.print(f"[{colour}]{finding.level.upper()}[/{colour}] {escape(finding.path)}: {escape(finding.message)}")
    jobs = {r.run_id: r for r in RunRegistry(state).records()}
    with ControlPlane(info.superlink_port, CertStore(Path(info.certs_dir))) as control:
        for node in control.nodes():
            console.print(f"  hospital {node.name or node.node_id}: {node.status}")
        for run_row in control.runs():
            record = jobs.get(run_row.run_id)
            done = completed_rounds(Path(record.out_dir)) if record else []
            console.print(
                f"  run {run_row.run_id} {record.job if record else '?'}: {run_row.status}"
                f"{':' + run_row.sub_status if run_row.sub_status else ''}"
                + (f", rounds done {max(done)}" if done else "")
            )
    if any(f.level == "error" for f in expiry):
        raise typer.Exit(1)


@app.command()
def logs(
    state: Path = STATE_OPTION,
    run_ref: str = typer.Option(
        "", "--run", help="A run id or job name: what happened in each round of that job (see below)."
    ),
    lines: int = typer.Option(50, "--lines", "-n", help="How many lines of the coordinator's logs."),
    as_json: bool = typer.Option(False, "--json", help="With --run: the per-round overview as JSON."),
    server_log: bool = typer.Option(
        False, "--server-log", help="With --run: print the run's raw ServerApp log instead of the overview."
    ),
) -> None:
    """The coordinator's logs (SuperLink, gateway), or what happened in each round of one run.

    With --run, per round: the sites that answered (under the run's site labels), updates rejected and
    the kind of error (never its text), sites that did not answer in time, loss and privacy budget
    (epsilon) per site, probe scores, bytes sent, round time. It reads the run's own files on this
    machine (metrics, checkpoints) and the ServerApp's log kept by the SuperLink. A resumed job is
    shown whole, across its submissions.
    """
    if run_ref and server_log:
        _print_server_log(state, run_ref)
        return
    if run_ref:
        from server.ops.run_summary import format_overview, overview

        try:
            view = overview(state, run_ref)
        except ConfigError as exc:
            _fail(exc)
            return
        if as_json:
            print(json.dumps(view.as_dict(), indent=1))
            return
        print("\n".join(format_overview(view)))  # plain text: no wrapping, colours or markup
        return
    for name in ("coordinator.log", "superlink.log"):
        path = state / "logs" / name
        if path.exists():
            console.rule(name)
            console.print("\n".join(path.read_text(errors="replace").splitlines()[-lines:]), markup=False)


def _print_server_log(state: Path, run_ref: str) -> None:
    from server.ops.coordinator import running_state
    from server.ops.runs import CONNECTION, RunRegistry, cli_home
    from strategies.protocol.processes import flower_env, flower_script

    try:
        info = running_state(state)
        record = RunRegistry(state).find(run_ref)
    except (RuntimeError, ConfigError) as exc:
        _fail(exc)
        return
    env = flower_env(cli_home(state, info))
    command = [flower_script("flwr"), "log", str(record.run_id), CONNECTION, "--show"]
    raise typer.Exit(subprocess.call(command, env=env))


@app.command()
def stop(
    run_ref: str = typer.Argument("", help="A run id or job name to stop (omit with --coordinator)."),
    state: Path = STATE_OPTION,
    coordinator: bool = typer.Option(False, "--coordinator", help="Stop the whole coordinator instead."),
) -> None:
    """Stop one run, or (--coordinator) the SuperLink and the gateway."""
    from certs.store import CertStore
    from server.ops.control import ControlPlane
    from server.ops.coordinator import running_state
    from server.ops.runs import RunRegistry
    from strategies.protocol.processes import pid_alive

    try:
        info = running_state(state)
    except RuntimeError as exc:
        _fail(exc, 1)
        return
    if coordinator:
        os.kill(info.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while pid_alive(info.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        console.print("coordinator stopped" if not pid_alive(info.pid) else "coordinator still stopping")
        return
    if not run_ref:
        _fail("name a run (id or job) to stop, or pass --coordinator")
    try:
        record = RunRegistry(state).find(run_ref)
    except ConfigError as exc:
        _fail(exc)
        return
    with ControlPlane(info.superlink_port, CertStore(Path(info.certs_dir))) as control:
        control.stop_run(record.run_id)
    console.print(
        f"run {record.run_id} ({record.job}) stopped; resume it with `visionfm-server run JOB --resume`"
    )


@app.command()
def export(
    run_ref: str = typer.Argument(..., help="A run id or job name."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to copy the encoders.", resolve_path=True),
    state: Path = STATE_OPTION,
    server_round: int = typer.Option(
        -1, "--round", help="Export a checkpointed round instead of the final encoders."
    ),
) -> None:
    """Copy a run's final encoders (timm-loadable safetensors with metadata) and fine-tuned task models
    (`<modality>.task.safetensors`, for `visionfm evaluate` / `predict`) to --out."""
    from server.ops.runs import RunRegistry, export_encoders

    try:
        record = RunRegistry(state).find(run_ref)
        copied = export_encoders(Path(record.out_dir), out, None if server_round < 0 else server_round)
    except ConfigError as exc:
        _fail(exc)
        return
    for path in copied:
        console.print(f"exported {path}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
