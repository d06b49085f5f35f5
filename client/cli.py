"""`visionfm-client`: hospital IT's command line (check the site, join the federation, read the audit log)."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from client.supernode_poll import DEFAULT_IDLE_POLL_S
from visionfm_core.errors import ConfigError

app = typer.Typer(
    help="Run this hospital's side of a visionfm-fed federation: check, join, audit.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold paths or keys
)
console = Console(soft_wrap=True)  # never wrap or cut a line: paths must stay whole
DEFAULT_WORK = Path("visionfm-site")
# Every path option is made absolute here: the SuperNode and its ClientApps run in other folders.
BUNDLE = typer.Option(
    ..., "--bundle", "-b", help="This hospital's bundle folder from the coordinator.", resolve_path=True
)
DATA = typer.Option(
    ..., "--data", "-d", help="The site's images: a folder, a DICOM folder or a .npz file.", resolve_path=True
)
MODALITIES = typer.Option(..., "--modalities", "-m", help="Comma-separated modalities held, e.g. fundus or oct,fundus.")
WORK = typer.Option(
    DEFAULT_WORK, "--work", help="This site's working folder (logs, audit log, Flower state).", resolve_path=True
)
GPU = typer.Option(None, "--gpu", help="GPU index to use; -1 for CPU only (default: Flower/torch's choice).")
COORDINATOR = typer.Option(None, "--coordinator", help="host:port of the coordinator (default: the bundle's).")

TASK_MANIFEST = typer.Option(
    None, "--task-manifest",
    help="Labelled data for a federated fine-tuning task other than classification: a CSV manifest (see "
    "`visionfm finetune --help` for the columns of each task), or '<modality>=<csv>,...' for several.")

COLOURS = {"ok": "green", "warn": "yellow", "fail": "red", "skip": "dim"}
# A training site hears from the coordinator only at its heartbeats (about every 20 s in Flower 1.42).
MIN_MAX_OFFLINE_S = 60


def _modalities(value: str) -> list[str]:
    return [m.strip() for m in value.split(",") if m.strip()]


def _absolute_manifests(spec: str) -> str:
    """The --task-manifest value with absolute paths (the SuperNode runs in another folder)."""
    from client.site import task_manifest_entries

    return ",".join(f"{modality}={Path(path).resolve()}" if modality else str(Path(path).resolve())
                    for modality, path in task_manifest_entries(spec))


@app.command()
def check(
    bundle: Path | None = typer.Option(
        None, "--bundle", "-b",
        help="This hospital's bundle folder from the coordinator; required unless --offline (a data-only "
        "check, which skips the certificate checks)."),
    data: Path = DATA,
    modalities: str = MODALITIES,
    work: Path = WORK,
    gpu: int | None = GPU,
    coordinator: str | None = COORDINATOR,
    offline: bool = typer.Option(
        False, "--offline", help="Do not contact the coordinator; with no --bundle, check data and hardware only."),
    headers_only: bool = typer.Option(False, "--headers-only", help="Index files without decoding every image."),
    task_manifest: str | None = TASK_MANIFEST,
    task: str = typer.Option("segmentation", "--task",
                             help="The task the --task-manifest is for: segmentation | landmarks | detection | "
                             "regression."),
) -> None:
    """Preflight before joining: data, modalities, corrupt files, GPU, disk, memory, certificates.

    Exit code 0 when the site can join (warnings allowed), 1 when something would fail. Nothing is
    sent anywhere except the certificate handshake with the coordinator (skip it with --offline).
    """
    from client.preflight import run_checks

    if bundle is None and not offline:
        console.print("[red]error:[/red] --bundle is required unless --offline (a data-only check)")
        raise typer.Exit(2)
    try:
        checks = run_checks(
            data, _modalities(modalities), bundle, work, coordinator, gpu, not offline, not headers_only,
            task_manifest, task,
        )
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    for item in checks:
        colour = COLOURS[item.verdict]
        console.print(f"[{colour}]{item.verdict.upper():4}[/{colour}] {item.name}: {escape(item.message)}")
        for line in item.details:
            console.print(f"       {line}", markup=False, highlight=False)
    failed = [c for c in checks if c.verdict == "fail"]
    console.print("[red]NOT READY[/red]" if failed else "[green]READY[/green] to join")
    raise typer.Exit(1 if failed else 0)


def _compile_setting(compile_mode: str | None) -> dict[str, str]:
    """`--compile` as a node-config entry (checked); imported only when given: it pulls in torch, which
    `join` itself does not need (only the ClientApp's executor does)."""
    if not compile_mode:
        return {}
    from visionfm_core.compile_mode import check_compile_mode

    return {"compile": check_compile_mode(compile_mode)}


@app.command()
def join(
    bundle: Path = BUNDLE,
    data: Path = DATA,
    modalities: str = MODALITIES,
    work: Path = WORK,
    gpu: int | None = GPU,
    coordinator: str | None = COORDINATOR,
    privacy_epsilon: float | None = typer.Option(
        None, "--privacy-epsilon", help="This site's DP budget epsilon (required when a run uses DP-SGD)."
    ),
    privacy_delta: float | None = typer.Option(None, "--privacy-delta", help="This site's DP budget delta."),
    cold: bool = typer.Option(
        False,
        "--cold",
        help="Let Flower's own SuperExec start a fresh ClientApp process per message "
        "(no pre-warmed executor; slower, but what stock Flower does).",
    ),
    max_offline: float = typer.Option(
        0.0,
        "--max-offline",
        help="Seconds the coordinator may stay unreachable (network outage, coordinator down) before "
        "join gives up with exit code 1; 0 (default) keeps retrying forever. At least 60 when set: an "
        "busy site hears from the coordinator only about every 20 s while it trains.",
    ),
    task_manifest: str | None = TASK_MANIFEST,
    devices: int = typer.Option(
        1,
        "--devices",
        min=1,
        help="Worker processes that train this site together, one per device (GPUs from --gpu on: NCCL; "
        "CPU: gloo); the site still sends one update per round.",
    ),
    compile_mode: str | None = typer.Option(
        None,
        "--compile",
        help="torch.compile this site's training steps: auto (on CUDA, with CUDA graphs) | on | off "
        "(node-config key `compile`; wins over the run's setting; default: the run's, itself auto).",
    ),
    state_keep_hours: float = typer.Option(
        72.0,
        "--state-keep-hours",
        help="Between-round training state of earlier runs (WORK/state/run-*, about 270 MB per modality at "
        "ViT-S) is deleted once nothing was written to it for this many hours.",
    ),
    idle_poll: float = typer.Option(
        DEFAULT_IDLE_POLL_S,
        "--idle-poll",
        min=0.1,
        max=3.0,
        help="Seconds the SuperNode waits before asking the coordinator again when it had no message "
        "(Flower's own wait is 3 s; a round starts at this site up to this long after it is sent).",
    ),
) -> None:
    """Join the federation and stay joined until Ctrl-C / SIGTERM.

    Only outbound connections are made (to the coordinator's gateway). Telemetry and update checks are
    off. Network outages and coordinator restarts are ridden out: the site reconnects on its own (see
    --max-offline). Everything the site sends is recorded in WORK/audit.jsonl (see `visionfm-client audit`).
    """
    from client.join import JoinRefusedError, SiteSettings, run_site
    from client.node_keys import KEEP_HOURS_KEY

    if 0 < max_offline < MIN_MAX_OFFLINE_S:
        console.print(f"[red]error:[/red] --max-offline must be 0 (never give up) or at least {MIN_MAX_OFFLINE_S}s")
        raise typer.Exit(2)
    # force: a library imported on the way (opacus) configures the root logger at import time, which would
    # make this call a no-op and silence the site's INFO lines ("reachable again", "joined").
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr,
                        force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    budget = {
        k: v for k, v in (("privacy-epsilon", privacy_epsilon), ("privacy-delta", privacy_delta)) if v is not None
    }
    try:
        manifest = {"task-manifest": _absolute_manifests(task_manifest)} if task_manifest else {}
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    settings = SiteSettings(
        bundle,
        data,
        _modalities(modalities),
        work,
        gpu,
        coordinator,
        warm=not cold,
        extra_node_config={**budget, KEEP_HOURS_KEY: state_keep_hours, **manifest, "devices": devices,
                           **_compile_setting(compile_mode)},
        max_offline_s=max_offline,
        idle_poll_s=idle_poll,
    )
    try:
        run_site(
            settings,
            stop,
            on_ready=lambda node: console.print(
                f"[green]joining[/green] as {node.bundle.hospital} (coordinator reached, SuperNode started); "
                f"logs in {work / 'logs'}"
            ),
        )
    except (JoinRefusedError, ConfigError) as exc:
        console.print(f"[red]cannot join:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    console.print("left the federation")


@app.command()
def audit(
    work: Path = WORK,
    run: int = typer.Option(0, "--run", help="Only this run id."),
    as_json: bool = typer.Option(False, "--json", help="Print the raw entries (JSON lines)."),
    privacy: bool = typer.Option(False, "--privacy", help="The privacy budget instead: epsilon spent and "
                                 "remaining per dataset and per run, from the site's ledger (WORK/privacy)."),
) -> None:
    """Everything that left this site: per reply the run, round, keys, shapes, bytes, epsilon, hash."""
    from client.audit import AuditLog, summarise

    if privacy:
        _privacy_audit(work, run, as_json)
        return

    log = AuditLog(work / "audit.jsonl")
    entries = [e for e in log.entries() if not run or e.get("run") in (None, run)]
    if as_json:
        for entry in entries:
            print(json.dumps(entry, sort_keys=True))
        return
    if not entries:
        console.print(f"no audit entries in {log.path}")
        return
    for entry in entries:
        when = datetime.fromtimestamp(float(entry["time"]), tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        if entry["event"] == "reply":
            eps = entry.get("epsilon")
            console.print(
                f"{when} run {entry.get('run')} round {entry.get('round')} {entry.get('message_type')}: "
                f"{len(entry.get('arrays', []))} arrays, {entry.get('bytes', 0):,} bytes, "
                f"{len(entry.get('numbers', {}))} numbers"
                + (f", epsilon {eps}" if eps is not None else "")
                + f", sha256 {entry.get('sha256', '')[:16]}"
            )
            for array in entry.get("arrays", []):
                console.print(
                    f"    {array['key']} {tuple(array['shape'])} {array['dtype']} {array['bytes']:,} B",
                    markup=False,
                )
        elif entry["event"] == "transport":
            console.print(f"{when} uplink: {entry.get('bytes_out', 0):,} bytes sent (all requests, TLS payload)")
        elif entry["event"] == "session":
            console.print(f"{when} session {entry.get('state')}")
    summary = summarise(iter(entries))
    console.print(
        f"total: {summary.replies} replies in {len(summary.runs)} run(s), "
        f"{summary.array_bytes:,} bytes of weights, "
        f"{summary.transport_bytes_out:,} bytes through the uplink"
        + (f", max epsilon {summary.max_epsilon}" if summary.max_epsilon is not None else "")
    )


def _privacy_audit(work: Path, run: int, as_json: bool) -> None:
    """`audit --privacy`: per dataset (modality, fingerprint) spent / budget / remaining, then per run.
    Exit code 1 when a ledger is damaged (the site refuses to train on that dataset)."""
    import dataclasses

    from client.privacy.ledger import WHAT_TO_DO, summarise_ledgers

    folder = work / "privacy"
    summaries = summarise_ledgers(folder)
    if as_json:
        for item in summaries:
            print(json.dumps({**dataclasses.asdict(item), "remaining": item.remaining}, sort_keys=True, default=str))
        raise typer.Exit(1 if any(s.problem for s in summaries) else 0)
    if not summaries:
        console.print(f"no privacy ledger in {folder}: no DP training has touched this site's data")
        return
    for item in summaries:
        name = f"{item.modality} dataset {item.fingerprint[:12]}"
        if item.problem:
            console.print(f"[red]DAMAGED[/red] {name}: {escape(item.problem)}; {WHAT_TO_DO}")
            continue
        budget = "none" if item.epsilon_budget is None else f"{item.epsilon_budget:g}"
        remaining = "-" if item.remaining is None else f"{item.remaining:.4g}"
        console.print(f"[bold]{name}[/bold] ({item.images} images): epsilon spent {item.epsilon_spent:.4g} of "
                      f"{budget} (delta {item.delta:g}), remaining {remaining}; {item.entries} charge(s) "
                      f"from {item.first} to {item.last}" if item.entries else f"[bold]{name}[/bold]: nothing spent")
        for row in item.runs:
            if run and row.run != run:
                continue
            console.print(f"    run {row.run}: {', '.join(row.phases)}, {row.rounds} round(s), {row.steps} step(s), "
                          f"epsilon {row.epsilon_alone:.4g} alone, lifetime epsilon {row.epsilon_after:.4g} after it",
                          markup=False)
    if any(s.problem for s in summaries):
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
