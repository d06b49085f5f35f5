"""What the dashboard shows, gathered from what the coordinator already has: the participants file,
the SuperLink's nodes and runs, the current job's metrics rows and the per-round overview of
`visionfm-server logs --run` (rejections reduced to their kind there). Numbers and site labels only:
nothing a hospital sent beyond what the coordinator already logs and reports."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from certs.participants import load_participants
from certs.store import CertStore
from server.ops.control import ControlPlane
from server.ops.run_summary import RunOverview, overview
from server.ops.runs import RunRegistry, completed_rounds

logger = logging.getLogger(__name__)
TRAIN_PHASES = ("train", "finetune")
RECENT_REJECTIONS = 20


@dataclass(frozen=True)
class Hospital:
    """A declared hospital and how the SuperLink sees it now."""

    name: str
    status: str  # "online", "offline", "registered", "revoked", "not registered"


@dataclass(frozen=True)
class RunRow:
    """One submission the coordinator knows."""

    run_id: int
    job: str
    status: str
    rounds_done: int


@dataclass(frozen=True)
class Rejection:
    """An update the coordinator refused (its kind only), a silent site, or a failed round."""

    round: int
    site: str
    kind: str


@dataclass
class CurrentRun:
    """The latest job: progress, timing, privacy and traffic per round and site."""

    job: str
    status: str
    rounds_done: int
    num_rounds: int | None
    in_progress: int | None  # the round being run now, if any
    strategy: str
    timings: list[dict[str, float]]  # per round: round, round_seconds, slowest_site_seconds, overhead_share
    epsilon: list[dict[str, Any]]  # per (site, modality): latest epsilon, delta, round
    bytes_per_round: dict[int, float]
    superlink_bytes: tuple[int, int]  # sent, received over all submissions
    rejections: list[Rejection]
    rows: list[dict[str, Any]]


@dataclass
class Snapshot:
    """Everything one page shows."""

    federation: str
    coordinator_started: float
    gateway: dict[str, int]
    hospitals: list[Hospital]
    runs: list[RunRow]
    current: CurrentRun | None
    taken_at: float = field(default_factory=time.time)
    problems: list[str] = field(default_factory=list)  # what could not be read (kind only)


# A hospital may have several node entries (an old key unregistered, a renewed one): the liveliest counts.
STATUS_RANK = {"online": 3, "offline": 2, "registered": 1, "unregistered": 0}


def _node_statuses(control: ControlPlane) -> dict[str, str]:
    statuses: dict[str, str] = {}
    for node in control.nodes():
        current = statuses.get(node.name)
        if node.name and (current is None or STATUS_RANK.get(node.status, 0) > STATUS_RANK.get(current, 0)):
            statuses[node.name] = node.status
    return statuses


def hospitals(store: CertStore, statuses: dict[str, str]) -> list[Hospital]:
    revoked = store.read_revoked()
    declared = load_participants(store.participants).hospitals
    return [
        Hospital(h.name, "revoked" if h.name in revoked else statuses.get(h.name, "not registered"))
        for h in declared
    ]


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        return None
    return float(value)


def latest_epsilon(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (site, modality): the epsilon spent up to its latest round (site DP-SGD and site-level DP)."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        epsilon = _finite(row.get("epsilon"))
        if epsilon is None or row.get("phase") not in (*TRAIN_PHASES, "central-dp"):
            continue
        key = (str(row["site"]), str(row["modality"]))
        if key not in latest or int(row["round"]) >= latest[key]["round"]:
            latest[key] = {"site": key[0], "modality": key[1], "round": int(row["round"]), "epsilon": epsilon,
                           "delta": _finite(row.get("delta")), "budget": _finite(row.get("epsilon_budget")),
                           "exhausted": bool(row.get("budget_exhausted"))}
    return [latest[k] for k in sorted(latest)]


def bytes_per_round(rows: list[dict[str, Any]]) -> dict[int, float]:
    """Bytes the sites sent per round (their updates), summed over sites."""
    totals: dict[int, float] = {}
    for row in rows:
        value = _finite(row.get("bytes_sent"))
        if row.get("phase") == "transport" and value is not None:
            totals[int(row["round"])] = totals.get(int(row["round"]), 0.0) + value
    return dict(sorted(totals.items()))


def _rejections(view: RunOverview) -> list[Rejection]:
    found: list[Rejection] = []
    for summary in view.rounds:
        found += [Rejection(summary.round, r["site"], r["kind"]) for r in summary.rejected]
        if summary.unanswered:
            found.append(Rejection(summary.round, f"{summary.unanswered} site(s)", "did not answer in time"))
        if summary.failed:
            found.append(Rejection(summary.round, "round", f"failed: {summary.failed}, global model kept"))
        found += [Rejection(summary.round, f["site"], f"evaluation failed ({f['kind']})")
                  for f in summary.evaluation_failures]
    return found[-RECENT_REJECTIONS:][::-1]


def current_run(state_dir: Path) -> CurrentRun | None:
    """The latest job on this coordinator, or None before the first one."""
    records = RunRegistry(state_dir).records()
    if not records:
        return None
    view = overview(state_dir, records[-1].job)
    out = Path(records[-1].out_dir)
    rows: list[dict[str, Any]] = []
    if (out / "metrics.json").is_file():
        try:
            rows = json.loads((out / "metrics.json").read_text())
        except json.JSONDecodeError:  # being replaced right now: the next refresh reads it
            rows = []
    done = [r for r in completed_rounds(out) if r > 0]
    rounds_done = max(done, default=0)
    latest = view.submissions[-1] if view.submissions else None
    status = latest.status if latest else "unknown"
    running = status.startswith("running") or status.startswith("starting") or status.startswith("pending")
    total = view.num_rounds
    in_progress = rounds_done + 1 if running and (total is None or rounds_done < total) else None
    timings = [{"round": float(s.round), **s.timing} for s in view.rounds if s.timing]
    return CurrentRun(
        job=view.job,
        status=status,
        rounds_done=rounds_done,
        num_rounds=total,
        in_progress=in_progress,
        strategy=view.strategy,
        timings=timings,
        epsilon=latest_epsilon(rows),
        bytes_per_round=bytes_per_round(rows),
        superlink_bytes=(sum(s.bytes_sent for s in view.submissions), sum(s.bytes_recv for s in view.submissions)),
        rejections=_rejections(view),
        rows=rows,
    )


def take_snapshot(
    state_dir: Path,
    store: CertStore,
    superlink_port: int,
    started_at: float,
    gateway_counts: Callable[[], dict[str, int]] | None = None,
) -> Snapshot:
    """Gather one page's facts; a part that cannot be read is named in `problems`, the rest still shows."""
    problems: list[str] = []
    statuses: dict[str, str] = {}
    runs: list[RunRow] = []
    records = RunRegistry(state_dir).records()
    try:
        with ControlPlane(superlink_port, store) as control:
            statuses = _node_statuses(control)
            jobs = {r.run_id: r for r in records}
            for run in control.runs():
                record = jobs.get(run.run_id)
                done = [r for r in completed_rounds(Path(record.out_dir)) if r > 0] if record else []
                status = run.status + (f":{run.sub_status}" if run.sub_status else "")
                runs.append(RunRow(run.run_id, record.job if record else "?", status, max(done, default=0)))
    except Exception as exc:  # the page still shows what the files hold
        logger.warning("dashboard: SuperLink not readable (%s)", type(exc).__name__)
        problems.append(f"SuperLink not readable ({type(exc).__name__})")
    current = None
    try:
        current = current_run(state_dir)
    except Exception as exc:
        logger.warning("dashboard: current run not readable (%s)", type(exc).__name__, exc_info=True)
        problems.append(f"current run not readable ({type(exc).__name__})")
    return Snapshot(
        federation=load_participants(store.participants).federation,
        coordinator_started=started_at,
        gateway=gateway_counts() if gateway_counts is not None else {},
        hospitals=hospitals(store, statuses),
        runs=runs[::-1],
        current=current,
        problems=problems,
    )
