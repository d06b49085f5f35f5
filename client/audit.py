"""The site's audit log: a record of everything that left the site, readable by hospital IT.

One JSON object per line in `<site folder>/audit.jsonl`:

* `reply`: one per message the ClientApp sent back: run, round, message type, each array's key,
  shape, dtype and size, the numbers (metrics) sent, the privacy budget spent (`epsilon`, when the
  reply reports one), a SHA-256 of the whole payload, and the seconds the app worked on it;
* `transport`: bytes that went out through the uplink (TLS payload, all requests included);
* `session`: when the site joined and left, and to which coordinator.

Never an image, a file path, a patient or site identifier: array keys are model parameter names,
metric keys are metric names. `audit_mod` writes the `reply` lines from inside the ClientApp; it is
a Flower mod, so the app only lists it: `ClientApp(mods=[audit_mod])`. It does nothing unless the
node config names an audit log (`visionfm-client join` does).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.node_keys import AUDIT_LOG_KEY  # node-config key holding the audit log's path (join sets it)

EPSILON_NAMES = ("epsilon", "dp-epsilon")  # a metric's last path segment, e.g. "fundus/epsilon"


def payload_digest(arrays: dict[str, tuple[str, tuple[int, ...], bytes]], numbers: dict[str, Any]) -> str:
    """SHA-256 over arrays (sorted by key: key, dtype, shape, bytes) and the numbers (canonical JSON)."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        dtype, shape, data = arrays[key]
        digest.update(f"{key}|{dtype}|{','.join(map(str, shape))}|{len(data)}|".encode())
        digest.update(data)
    digest.update(json.dumps(numbers, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def describe_reply(content: Any) -> dict[str, Any]:
    """Keys, shapes, sizes, numbers and hash of a reply's RecordDict (no array values): one row per
    tensor (its raw size), and under "bytes" the arrays' size as they travel (serialised, packed)."""
    arrays: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    array_rows = []
    wire_bytes = 0
    # Imported here, where a reply is described (inside the ClientApp): `join` imports this module for
    # AuditLog and must start without torch (records.py imports it).
    from strategies.protocol.records import record_to_numpy

    for record_name, record in content.array_records.items():
        wire_bytes += sum(len(array.data) for array in record.values())  # as serialised, packing included
        for key, array in record_to_numpy(record).items():  # each tensor, not the packed buffers
            name = f"{record_name}/{key}"
            data = array.tobytes()
            arrays[name] = (str(array.dtype), tuple(int(s) for s in array.shape), data)
            array_rows.append({"key": name, "shape": list(array.shape), "dtype": str(array.dtype), "bytes": len(data)})
    numbers: dict[str, Any] = {}
    for record_name, metric_record in content.metric_records.items():
        for key, value in metric_record.items():
            numbers[f"{record_name}/{key}"] = _finite(value)
    for record_name, config_record in content.config_records.items():
        for key, value in config_record.items():
            if isinstance(value, (int, float, bool)):
                numbers[f"{record_name}/{key}"] = _finite(value)
            else:  # strings and bytes could carry anything: record only their size
                numbers[f"{record_name}/{key}"] = f"<{type(value).__name__}: {len(value)} bytes>"
    spent = [v for k, v in numbers.items() if k.rsplit("/", 1)[-1] in EPSILON_NAMES and isinstance(v, (int, float))]
    epsilon = max(spent) if spent else None  # the largest budget spent by any of the site's modalities
    return {
        "arrays": array_rows,
        "numbers": numbers,
        "bytes": wire_bytes,
        "epsilon": epsilon,
        "sha256": payload_digest(arrays, numbers),
    }


class AuditLog:
    """Append-only JSON-lines file (0600: it is the site's record, not the coordinator's)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, event: str, **fields: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"time": time.time(), "event": event, **fields}, sort_keys=True) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line.encode())  # one write per line: appends from several processes do not interleave
        finally:
            os.close(fd)

    def entries(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with self.path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line)


def audit_mod(msg: Any, context: Any, call_next: Any) -> Any:
    """Flower mod: after the app answers, log what the reply carries (when the site has an audit log)."""
    started = time.perf_counter()
    reply = call_next(msg, context)
    seconds = time.perf_counter() - started
    path = context.node_config.get(AUDIT_LOG_KEY)
    if not path or not reply.has_content():
        return reply
    config = msg.content.config_records.get("config", {}) if msg.has_content() else {}
    server_round = config.get("server-round") if hasattr(config, "get") else None
    AuditLog(str(path)).append(
        "reply",
        run=int(context.run_id),
        round=int(server_round) if isinstance(server_round, (int, float)) else None,
        message_type=str(msg.metadata.message_type),
        seconds=round(seconds, 4),  # time the app spent on this message (local compute)
        **describe_reply(reply.content),
    )
    return reply


@dataclass
class AuditSummary:
    """Totals over an audit log, for `visionfm-client audit`."""

    replies: int = 0
    array_bytes: int = 0
    runs: set[int] = field(default_factory=set)
    max_epsilon: float | None = None
    transport_bytes_out: int = 0
    sessions: int = 0


def summarise(entries: Iterator[dict[str, Any]]) -> AuditSummary:
    summary = AuditSummary()
    for entry in entries:
        if entry.get("event") == "reply":
            summary.replies += 1
            summary.array_bytes += int(entry.get("bytes", 0))
            if entry.get("run") is not None:
                summary.runs.add(int(entry["run"]))
            eps = entry.get("epsilon")
            if isinstance(eps, (int, float)):
                summary.max_epsilon = max(eps, summary.max_epsilon or 0.0)
        elif entry.get("event") == "transport":
            summary.transport_bytes_out += int(entry.get("bytes_out", 0))
        elif entry.get("event") == "session" and entry.get("state") == "start":
            summary.sessions += 1
    return summary
