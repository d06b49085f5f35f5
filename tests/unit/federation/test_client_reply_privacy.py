"""Call the real ClientApp with a real Flower Message and inspect exactly what would leave the site."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import simulations
from client.app import app as client_app
from strategies.protocol.records import arrays_to_record, record_to_numpy
from tests.csv_files import write_csv
from visionfm_core.pretraining import initial_global_arrays
from visionfm_core.run_config import RunConfig

OCT = Path(simulations.__file__).parent / "data" / "oct2017_val"
PATIENT = "DOE^JANE-4711"


@pytest.fixture()
def site_folder(tmp_path: Path) -> Path:
    """A hospital folder whose file names and labels CSV carry identifying strings."""
    root = tmp_path / "st-mary-eye-hospital" / "export"
    rows = []
    for i, src in enumerate(sorted(OCT.glob("val/*/*.jpeg"))[:12]):
        name = f"{PATIENT}_visit{i}.jpeg"
        (root / src.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / src.parent.name / name)
        rows.append({"path": f"{src.parent.name}/{name}", "label": src.parent.name, "patient_id": f"{PATIENT}{i % 4}"})
    write_csv(root / "labels.csv", rows)
    return root


def _message(cfg: RunConfig, message_type: str) -> Message:
    arrays = initial_global_arrays(cfg)
    config = ConfigRecord({**cfg.to_flat(), "server-round": 1})
    return Message(RecordDict({"arrays": arrays_to_record(arrays), "config": config}), dst_node_id=7,
                   message_type=message_type)


@pytest.mark.parametrize("message_type", [MessageType.TRAIN, MessageType.EVALUATE])
def test_reply_holds_only_weight_arrays_and_numbers(site_folder: Path, message_type: str) -> None:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 7
    cfg = RunConfig(num_rounds=1, local_steps=1, batch_size=4, arch="nano", image_size=32, patch_size=8,
                    modalities="oct", knn_k=3, ssl={"out_dim": 32, "head_hidden_dim": 32, "head_bottleneck_dim": 16,
                                                     "local_crops": 0})
    context = Context(run_id=1, node_id=7, node_config={"data-path": str(site_folder), "modalities": "oct"},
                      state=RecordDict(), run_config={})
    request = _message(cfg, message_type)
    reply = client_app(request, context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    content = reply.content
    if message_type == MessageType.TRAIN:  # only which round and global model it answers
        assert set(content.config_records) == {"reply"}
        assert set(content.config_records["reply"]) == {"server-round", "model-digest"}
    else:
        assert set(content.config_records) == set()
    for record in content.metric_records.values():
        assert all(isinstance(v, (int, float)) for v in record.values())
    if message_type == MessageType.TRAIN:
        sent = record_to_numpy(content.array_records["arrays"])
        assert set(sent) <= set(record_to_numpy(request.content.array_records["arrays"]))
        assert all(key.startswith("oct/backbone.") or key.startswith("oct/head.") for key in sent)
        # The teacher and the DINO centres stay on the site, in the node's state.
        assert not any("teacher" in key or "center" in key for key in sent)
        assert any(key.startswith("local-ssl-state/") for key in context.state.array_records)
    # Nothing identifying in the serialised reply: no folder, file or patient name, no label text.
    payload = b"".join(record.deflate() for record in content.values()) + content.deflate()
    for secret in (PATIENT, "st-mary", "visit0", "DRUSEN", str(site_folder)):
        assert secret.encode() not in payload
        for record in content.values():
            assert all(secret not in key for key in record)
    # No image either: the raw bytes of the first image's first row do not appear.
    first_image = np.asarray(__import__("PIL.Image").Image.open(next(site_folder.rglob("*.jpeg"))))
    row = first_image[first_image.shape[0] // 2, :64]
    assert row.std() > 0
    assert row.tobytes() not in payload


def test_a_failing_site_answers_with_the_error_kind_and_never_its_paths(tmp_path: Path) -> None:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 7
    cfg = RunConfig(num_rounds=1, local_steps=1, batch_size=4, arch="nano", image_size=32, patch_size=8,
                    modalities="oct", ssl={"out_dim": 32, "head_hidden_dim": 32, "head_bottleneck_dim": 16})
    missing = tmp_path / "st-mary-eye-hospital" / f"{PATIENT}_scans"
    context = Context(run_id=1, node_id=7, node_config={"data-path": str(missing), "modalities": "oct"},
                      state=RecordDict(), run_config={})
    reply = client_app(_message(cfg, MessageType.TRAIN), context)
    assert reply.has_error()
    reason = reply.error.reason
    assert "at the site" in reason or "config key" in reason
    assert PATIENT not in reason and "st-mary" not in reason and str(tmp_path) not in reason
