"""The real ClientApp (client/app.py) with its training reply rewritten at one site.

The site whose environment names a plan file (`VISIONFM_TAMPER_PLAN`, JSON {"<round>": "<mode>"}) trains
honestly, then rewrites its reply the way the plan says for that round; every other site, and every
round the plan leaves out, answers exactly as the real app does. Modes: `capture` (keep this round's
honest reply for a later replay), `count-nan`, `count-inf`, `count-1e15`, `count-1.7e308`,
`manifest-not-json`, `manifest-wrong-shape`, `plus-1e4` (add 1e4 to every weight), `replay` (send the
captured reply as it was) and `replay-relabelled` (the captured arrays, labelled with this round).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from flwr.app import Array, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from client import app as real
from client.audit import audit_mod
from client.error_mod import safe_error_mod
from strategies.protocol.records import MANIFEST_KEY, arrays_to_record, record_to_numpy

PLAN_ENV = "VISIONFM_TAMPER_PLAN"
COUNTS = {"count-nan": float("nan"), "count-inf": float("inf"), "count-1e15": 1e15, "count-1.7e308": 1.7e308}

def _round(msg: Message) -> int:
    return int(str(msg.content.config_records["config"]["server-round"]))


def _with_counts(content: RecordDict, value: float) -> RecordDict:
    metrics = dict(content.metric_records["metrics"])
    for key in [k for k in metrics if k.endswith("num-examples")]:
        metrics[key] = value
    content["metrics"] = MetricRecord(metrics)
    return content


def _with_manifest(content: RecordDict, raw: bytes) -> RecordDict:
    content.array_records["arrays"][MANIFEST_KEY] = Array.from_numpy_ndarray(np.frombuffer(raw, dtype=np.uint8))
    return content


def _wrong_shape(content: RecordDict) -> RecordDict:
    record = content.array_records["arrays"]
    manifest = json.loads(record[MANIFEST_KEY].numpy().tobytes())
    manifest[0]["shape"] = [dim * 1000 for dim in manifest[0]["shape"]] or [1000]
    return _with_manifest(content, json.dumps(manifest).encode())


def _shifted(content: RecordDict, amount: float) -> RecordDict:
    arrays = record_to_numpy(content.array_records["arrays"])
    content["arrays"] = arrays_to_record({k: (v + np.float32(amount)).astype(v.dtype) for k, v in arrays.items()})
    return content


def _capture(folder: Path, content: RecordDict) -> None:
    np.savez(folder / "captured.npz", **record_to_numpy(content.array_records["arrays"]))
    captured = {"metrics": dict(content.metric_records["metrics"]), "reply": dict(content.config_records["reply"])}
    (folder / "captured.json").write_text(json.dumps(captured))


def _replay(folder: Path, msg: Message, relabel: bool) -> RecordDict:
    with np.load(folder / "captured.npz") as data:
        arrays = {key: data[key] for key in data.files}
    captured = json.loads((folder / "captured.json").read_text())
    info = real.reply_info(msg) if relabel else ConfigRecord(captured["reply"])
    return RecordDict({"arrays": arrays_to_record(arrays), "metrics": MetricRecord(captured["metrics"]), "reply": info})


def tampered(mode: str, msg: Message, content: RecordDict, folder: Path) -> RecordDict:
    """The reply `mode` makes of the honest reply `content`."""
    if mode == "capture":
        _capture(folder, content)
        return content
    if mode in COUNTS:
        return _with_counts(content, COUNTS[mode])
    if mode == "manifest-not-json":
        return _with_manifest(content, b"\xff\xfe this is not JSON")
    if mode == "manifest-wrong-shape":
        return _wrong_shape(content)
    if mode == "plus-1e4":
        return _shifted(content, 1e4)
    if mode in ("replay", "replay-relabelled"):
        return _replay(folder, msg, relabel=mode == "replay-relabelled")
    raise ValueError(f"unknown tamper mode {mode!r}")


def tamper_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Outermost: rewrites the reply after the site's own mods (the audit log records the honest one)."""
    honest = call_next(msg, context)
    plan_path = os.environ.get(PLAN_ENV)
    if msg.metadata.message_type != MessageType.TRAIN or not plan_path or honest.has_error():
        return honest
    plan = json.loads(Path(plan_path).read_text())
    mode = plan.get(str(_round(msg)))
    if not mode:
        return honest
    return Message(content=tampered(mode, msg, honest.content, Path(plan_path).parent), reply_to=msg)


app = ClientApp(mods=[tamper_mod, safe_error_mod, audit_mod])
app.train()(real.train)
app.evaluate()(real.evaluate)
app.query()(real.query)
