"""The site's audit log: what a reply carries is recorded (keys, shapes, bytes, numbers, hash), never
array values or strings; the Flower mod writes only where the node config names a log."""

from __future__ import annotations

import io
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client.audit import AuditLog, audit_mod, describe_reply, summarise
from strategies.protocol.records import arrays_to_record


def _npy_size(array: np.ndarray) -> int:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return len(buffer.getvalue())


def _reply(scale: float = 1.0) -> RecordDict:
    weights = ArrayRecord()
    weights["fundus/backbone.blocks.0.attn.qkv.weight"] = Array.from_numpy_ndarray(
        np.full((6, 2), scale, dtype=np.float32)
    )
    weights["fundus/backbone.cls_token"] = Array.from_numpy_ndarray(np.zeros((1, 1, 2), dtype=np.float32))
    return RecordDict(
        {
            "arrays": weights,
            "metrics": MetricRecord(
                {"fundus/loss": 1.5, "num-examples": 48.0, "fundus/epsilon": 2.5, "oct/epsilon": 1.0}
            ),
            "config": ConfigRecord({"note": "/data/patient-123/img.png", "steps": 3}),
        }
    )


def test_reply_description_lists_shapes_and_sizes_and_hides_strings() -> None:
    described = describe_reply(_reply())
    arrays = {a["key"]: a for a in described["arrays"]}
    assert arrays["arrays/fundus/backbone.blocks.0.attn.qkv.weight"]["shape"] == [6, 2]
    assert arrays["arrays/fundus/backbone.blocks.0.attn.qkv.weight"]["bytes"] == 6 * 2 * 4  # the tensor's values
    # Bytes as they travel: Flower serialises each array in .npy format (header + values).
    expected = _npy_size(np.full((6, 2), 1.0, np.float32)) + _npy_size(np.zeros((1, 1, 2), np.float32))
    assert described["bytes"] == expected
    assert described["numbers"]["metrics/fundus/loss"] == 1.5
    assert described["epsilon"] == 2.5
    # A string could carry anything (here: a path with a patient id): only its size is logged.
    assert "patient" not in str(described)
    assert described["numbers"]["config/note"].startswith("<str:")


def test_a_packed_reply_is_described_tensor_by_tensor_with_the_bytes_that_travel() -> None:
    tensors = {"fundus/backbone.cls_token": np.ones((1, 1, 2), np.float32), "fundus/steps": np.arange(3)}
    record = arrays_to_record(tensors)
    described = describe_reply(RecordDict({"arrays": record}))
    rows = {a["key"]: a for a in described["arrays"]}
    assert set(rows) == {"arrays/fundus/backbone.cls_token", "arrays/fundus/steps"}
    assert rows["arrays/fundus/backbone.cls_token"]["shape"] == [1, 1, 2]
    assert rows["arrays/fundus/steps"]["dtype"] == "int64"
    assert described["bytes"] == sum(len(a.data) for a in record.values())  # packed buffers and manifest
    assert described["sha256"] == describe_reply(_reply_of(tensors))["sha256"]  # the same tensors, unpacked


def _reply_of(tensors: dict[str, np.ndarray]) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in tensors.items()})})


def test_payload_hash_changes_with_any_value() -> None:
    assert describe_reply(_reply(1.0))["sha256"] == describe_reply(_reply(1.0))["sha256"]
    assert describe_reply(_reply(1.0))["sha256"] != describe_reply(_reply(1.0 + 1e-6))["sha256"]


class _Message:
    def __init__(self, content: RecordDict, server_round: int = 3) -> None:
        self.content = content
        self.metadata = SimpleNamespace(message_type="train")
        self._round = server_round

    def has_content(self) -> bool:
        return True


def test_mod_logs_replies_only_where_the_site_has_an_audit_log(tmp_path: Path) -> None:
    incoming = _Message(RecordDict({"config": ConfigRecord({"server-round": 3})}))
    reply = _Message(_reply())
    log_path = tmp_path / "site" / "audit.jsonl"
    context = SimpleNamespace(node_config={"audit-log": str(log_path)}, run_id=42)
    assert audit_mod(incoming, context, lambda m, c: reply) is reply
    entry = next(AuditLog(log_path).entries())
    assert entry["event"] == "reply" and entry["run"] == 42 and entry["round"] == 3
    assert entry["message_type"] == "train" and entry["sha256"] == describe_reply(reply.content)["sha256"]
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600

    simulation = SimpleNamespace(node_config={"partition-id": 0}, run_id=1)
    audit_mod(incoming, simulation, lambda m, c: reply)
    assert len(list(AuditLog(log_path).entries())) == 1


def test_summary_adds_up_replies_and_uplink_bytes(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("session", state="start")
    log.append("reply", run=1, bytes=100, epsilon=0.5)
    log.append("reply", run=2, bytes=50, epsilon=1.25)
    log.append("transport", bytes_out=4000)
    summary = summarise(log.entries())
    assert (summary.replies, summary.array_bytes, summary.runs) == (2, 150, {1, 2})
    assert summary.max_epsilon == 1.25 and summary.transport_bytes_out == 4000 and summary.sessions == 1
