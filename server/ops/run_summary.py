"""What happened in each round of a run, for `visionfm-server logs --run`: from the run's own files.

Sources, all on the coordinator's disk: the metrics rows (`metrics.json`: per site and round the
training numbers, epsilon, bytes sent; probe evaluations; round timing), the round checkpoints, and
the ServerApp's log (kept by the SuperLink; rejected updates, sites that did not answer, failed
rounds). Rejections are reduced to their kind: a reason may quote an exception raised at a site, and
only its class is shown, never its text (which could name a file). Sites appear under the labels the
ServerApp gives them (`site-1`, ...), never with an address or path.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Numbers shown per site and round, in this order, when present.
SITE_NUMBERS = ("loss", "epsilon", "delta", "budget_exhausted", "num_examples")
PROBE_NUMBERS = ("knn_accuracy", "knn_auc", "linear_accuracy", "linear_auc", "accuracy", "auc", "f1", "dice")
TIMING_NUMBERS = ("round_seconds", "slowest_site_seconds", "overhead_seconds", "overhead_share")
TRAIN_PHASES = ("train", "finetune")
EVALUATE_PHASES = ("evaluate", "finetune-evaluate")

# ServerApp log lines (server/federation/rounds.py and server/federation/finetune_phase.py word them so).
REJECTED = re.compile(r"round (\d+): update from (\S+) rejected: (.*)$")
UNANSWERED = re.compile(r"round (\d+) ([\w -]+?): (\d+) site\(s\) did not answer")
ROUND_FAILED = re.compile(r"round (\d+) failed: (.*)$")
EVAL_FAILED = re.compile(r"round (\d+): evaluation failed at (\S+): (.*)$")
DROPPED = re.compile(r"round (\d+) secagg (\S+): a site dropped out \((.*)\)$")

# Validation problems (strategies/validation.py) -> their kind.
INVALID_UPDATE_KINDS = (
    ("NaN or Inf", "non-finite values"),
    ("shape", "wrong shape"),
    ("dtype", "wrong dtype"),
    ("not a numpy array", "wrong type"),
    ("unknown key", "unknown key"),
    ("missing key", "partial update"),
    ("prefix", "malformed key"),
    ("example count", "bad example count"),
    ("no arrays", "empty update"),
    ("did not announce", "unannounced modality"),
    ("stale reply", "stale reply"),
    ("does not say which round", "stale reply"),
    ("replayed update", "replayed update"),
    ("update norm", "update norm over the bound"),
    ("manifest", "malformed record"),
    ("buffer", "malformed record"),
    ("unreadable reply", "malformed record"),
    ("metric", "bad metric"),
)
# Errors Flower itself raises on the SuperLink ("Error: Node Unavailable — ...").
FLOWER_ERROR = re.compile(r"Error: ([A-Za-z ]+?) [—-]")
PYTHON_CLASS = re.compile(r"<class '([\w.]+)'>")
ERROR_CLASS = re.compile(r"([A-Z][A-Za-z0-9_]*(?:Error|Exception|Exceeded|Interrupt|Exit))\b")


def error_kind(reason: str) -> str:
    """The kind of an error a site answered with (an exception class or Flower's error name)."""
    for pattern in (PYTHON_CLASS, FLOWER_ERROR, ERROR_CLASS):
        match = pattern.search(reason)
        if match is not None:
            return match[1].rsplit(".", 1)[-1]
    if "load `ClientApp`" in reason:
        return "ClientApp not loadable"
    return "unknown error"


def rejection_kind(reason: str) -> str:
    """A rejection reason reduced to its kind: no site text, paths or values survive."""
    if reason.startswith("site error:"):
        return f"site error ({error_kind(reason)})"
    if reason.startswith("undecodable"):
        return "undecodable update"
    if reason.startswith("secure aggregation aborted"):
        return "secure aggregation aborted"
    for needle, kind in INVALID_UPDATE_KINDS:
        if needle in reason:
            return f"invalid update ({kind})"
    return "invalid update"


@dataclass
class RoundLog:
    """What the ServerApp logged about one round."""

    rejected: list[dict[str, str]] = field(default_factory=list)  # {"site": ..., "kind": ...}
    unanswered: int = 0
    failed: str = ""  # kind of failure when the round kept the previous global model
    evaluation_failures: list[dict[str, str]] = field(default_factory=list)


def parse_server_log(text: str) -> dict[int, RoundLog]:
    """The per-round events of ServerApp log text (any other line is ignored)."""
    rounds: dict[int, RoundLog] = {}
    for line in text.splitlines():
        if match := REJECTED.search(line):
            entry = rounds.setdefault(int(match[1]), RoundLog())
            entry.rejected.append({"site": match[2], "kind": rejection_kind(match[3])})
        elif match := UNANSWERED.search(line):
            rounds.setdefault(int(match[1]), RoundLog()).unanswered += int(match[3])
        elif match := ROUND_FAILED.search(line):
            rounds.setdefault(int(match[1]), RoundLog()).failed = (
                "too few accepted updates" if "accepted" in match[2] else "no site trained"
            )
        elif match := EVAL_FAILED.search(line):
            entry = rounds.setdefault(int(match[1]), RoundLog())
            entry.evaluation_failures.append({"site": match[2], "kind": error_kind(match[3])})
        elif match := DROPPED.search(line):
            entry = rounds.setdefault(int(match[1]), RoundLog())
            entry.rejected.append({"site": f"secagg {match[2]}", "kind": f"dropped out ({error_kind(match[3])})"})
    return rounds


@dataclass
class RoundSummary:
    """One round of a run, as the coordinator's files record it."""

    round: int
    checkpointed: bool
    answered: list[str]  # sites whose update was accepted
    sites: dict[str, dict[str, float]]  # site -> its numbers (per modality, "<modality>/<name>"), bytes_sent
    rejected: list[dict[str, str]]
    unanswered: int
    failed: str
    evaluation: list[dict[str, Any]]  # {"site", "modality", <probe metric>: value}
    evaluation_failures: list[dict[str, str]]
    timing: dict[str, float]
    central_epsilon: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
        return None
    return float(value)


def _site_numbers(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    sites: dict[str, dict[str, float]] = {}
    for row in rows:
        numbers = sites.setdefault(str(row["site"]), {})
        if row["phase"] == "transport":
            numbers["bytes_sent"] = numbers.get("bytes_sent", 0.0) + float(row.get("bytes_sent", 0.0))
            continue
        for name in SITE_NUMBERS:
            value = _number(row.get(name))
            if value is not None:
                numbers[f"{row['modality']}/{name}"] = value
    return sites


def _probe(row: Mapping[str, Any]) -> dict[str, Any]:
    scores = {k: float(row[k]) for k in PROBE_NUMBERS if _number(row.get(k)) is not None}
    return {"site": row["site"], "modality": row["modality"], **scores}


def summarise_rounds(
    rows: Sequence[Mapping[str, Any]], server_log: Mapping[int, RoundLog], checkpointed: Iterable[int]
) -> list[RoundSummary]:
    """Per round (0 = the initial evaluation): sites, numbers, rejections, probes, timing."""
    done = set(checkpointed)
    numbers = {int(r["round"]) for r in rows} | set(server_log) | done
    summaries = []
    for server_round in sorted(numbers):
        mine = [r for r in rows if int(r["round"]) == server_round]
        trained = [r for r in mine if r["phase"] in TRAIN_PHASES]
        transport = [r for r in mine if r["phase"] == "transport"]
        events = server_log.get(server_round, RoundLog())
        evaluation = [_probe(r) for r in mine if r["phase"] in EVALUATE_PHASES]
        timing = next((r for r in mine if r["phase"] == "timing"), {})
        central = next((r for r in mine if r["phase"] == "central-dp"), {})
        summaries.append(
            RoundSummary(
                round=server_round,
                checkpointed=server_round in done,
                answered=sorted({str(r["site"]) for r in trained}),
                sites=_site_numbers([*trained, *transport]),
                rejected=events.rejected,
                unanswered=events.unanswered,
                failed=events.failed,
                evaluation=evaluation,
                evaluation_failures=events.evaluation_failures,
                timing={k: float(timing[k]) for k in TIMING_NUMBERS if _number(timing.get(k)) is not None},
                central_epsilon=_number(central.get("epsilon")),
            )
        )
    return summaries


def _fmt(value: float) -> str:
    if value == int(value) and abs(value) >= 100:
        return f"{int(value):,}"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def format_round(summary: RoundSummary) -> list[str]:
    """Plain-text lines for one round (the CLI prints them)."""
    head = [f"round {summary.round}" + ("" if summary.checkpointed else " (not checkpointed)")]
    if summary.round > 0 or summary.answered:
        names = f": {', '.join(summary.answered)}" if summary.answered else ""
        head.append(f"{len(summary.answered)} site(s) answered{names}")
    if summary.unanswered:
        head.append(f"{summary.unanswered} did not answer in time")
    if summary.rejected:
        head.append(f"{len(summary.rejected)} rejected")
    if summary.failed:
        head.append(f"FAILED: {summary.failed}, global model kept")
    total_bytes = sum(n.get("bytes_sent", 0.0) for n in summary.sites.values())
    if total_bytes:
        head.append(f"{_fmt(total_bytes)} bytes")
    if summary.timing:
        share = summary.timing.get("overhead_share")
        head.append(
            f"{summary.timing.get('round_seconds', 0.0):.1f}s"
            + (f" ({share:.0%} overhead)" if share is not None else "")
        )
    lines = [" · ".join(head)]
    for site, values in sorted(summary.sites.items()):
        parts = [f"{name.replace('/', ' ').replace('_', ' ')} {_fmt(v)}" for name, v in values.items()]
        lines.append(f"    {site}: " + ", ".join(parts))
    lines += [f"    rejected {r['site']}: {r['kind']}" for r in summary.rejected]
    for probe in summary.evaluation:
        parts = [f"{k.replace('_', ' ')} {_fmt(float(v))}" for k, v in probe.items() if k not in ("site", "modality")]
        lines.append(f"    probe {probe['site']} {probe['modality']}: " + ", ".join(parts))
    lines += [f"    evaluation failed at {f['site']}: {f['kind']}" for f in summary.evaluation_failures]
    if summary.central_epsilon is not None:
        lines.append(f"    site-level DP: epsilon {summary.central_epsilon:.3g}")
    return lines


def parse_server_logs(parts: Sequence[tuple[str, int | None]]) -> dict[int, RoundLog]:
    """Events of several ServerApp logs of one job (a run and its resumptions, oldest first).

    Each part is (log text, last round that part's run completed for good, or None for the latest run):
    a resumed run re-runs the round the dead one had started, so only the rounds a run finished count.
    """
    merged: dict[int, RoundLog] = {}
    for text, kept_upto in parts:
        for server_round, events in parse_server_log(text).items():
            if kept_upto is None or server_round <= kept_upto:
                merged[server_round] = events
    return merged


@dataclass
class Submission:
    """One submission of the job to the SuperLink."""

    run_id: int
    resumed_from: int | None
    status: str = "unknown (coordinator not running)"
    bytes_sent: int = 0
    bytes_recv: int = 0


@dataclass
class RunOverview:
    """Everything `visionfm-server logs --run` shows about a job."""

    job: str
    num_rounds: int | None
    strategy: str
    min_sites: int | None
    submissions: list[Submission]
    rounds: list[RoundSummary]
    log_source: str  # where the rejections came from

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def overview(state_dir: Path, ref: str) -> RunOverview:
    """Gather a job's run overview from the coordinator's state folder (`ref`: job name or run id).

    The ServerApp logs come from the running coordinator's SuperLink; without one, from the notes of
    the job's report (written when a run finishes: rejections of its last submission only)."""
    from certs.store import CertStore
    from server.ops.control import ControlPlane
    from server.ops.coordinator import running_state
    from server.ops.runs import RunRegistry, completed_rounds

    record = RunRegistry(state_dir).find(ref)
    chain = [r for r in RunRegistry(state_dir).records() if r.job == record.job and r.out_dir == record.out_dir]
    # Only the submissions since the last fresh start fed this folder.
    fresh = max((i for i, r in enumerate(chain) if r.resumed_from is None), default=0)
    chain = chain[fresh:]
    out = Path(record.out_dir)
    rows = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else []
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else {}
    submissions = [Submission(r.run_id, r.resumed_from) for r in chain]
    kept = [later.resumed_from for later in chain[1:]] + [None]
    try:
        state = running_state(state_dir)
    except RuntimeError:
        report = out / "report.md"
        notes = report.read_text() if report.is_file() else ""
        events = parse_server_logs([(notes, None)])
        source = "the run's report (coordinator not running: last submission only)"
    else:
        parts = []
        with ControlPlane(state.superlink_port, CertStore(Path(state.certs_dir))) as control:
            for submission, upto in zip(submissions, kept, strict=True):
                info = control.runs(submission.run_id)
                if info:
                    run = info[0]
                    submission.status = run.status + (f":{run.sub_status}" if run.sub_status else "")
                    submission.bytes_sent, submission.bytes_recv = run.bytes_sent, run.bytes_recv
                parts.append((control.server_log(submission.run_id), upto))
        events = parse_server_logs(parts)
        source = "the ServerApp logs kept by the SuperLink"
    rounds = summarise_rounds(rows, events, completed_rounds(out))
    num_rounds = config.get("num-rounds")
    min_sites = config.get("min-sites")
    return RunOverview(
        job=record.job,
        num_rounds=int(num_rounds) if isinstance(num_rounds, (int, float)) else None,
        strategy=str(config.get("strategy", "?")),
        min_sites=int(min_sites) if isinstance(min_sites, (int, float)) else None,
        submissions=submissions,
        rounds=rounds,
        log_source=source,
    )


def format_overview(view: RunOverview) -> list[str]:
    """Plain-text lines of a whole overview."""
    done = [r.round for r in view.rounds if r.checkpointed and r.round > 0]
    total = f" of {view.num_rounds}" if view.num_rounds is not None else ""
    lines = [
        f"job {view.job}: {max(done, default=0)}{total} rounds checkpointed · strategy {view.strategy}"
        + (f" · at least {view.min_sites} site(s) per round" if view.min_sites is not None else "")
    ]
    for s in view.submissions:
        how = f"resumed after round {s.resumed_from}" if s.resumed_from is not None else "started"
        traffic = f", SuperLink sent {s.bytes_sent:,} B / received {s.bytes_recv:,} B" if s.bytes_sent else ""
        lines.append(f"  run {s.run_id} ({how}): {s.status}{traffic}")
    lines.append(f"  rejections and missing answers from {view.log_source}")
    for summary in view.rounds:
        lines += format_round(summary)
    return lines
