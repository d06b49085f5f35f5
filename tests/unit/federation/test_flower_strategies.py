"""A stock Flower strategy aggregates the real ClientApp's packed replies through the adapter."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

import simulations
from client.app import app as client_app
from strategies.protocol.flower_strategies import PackedRecordsStrategy, unpacked_record
from strategies.protocol.records import MANIFEST_KEY, arrays_to_record, record_to_numpy
from visionfm_core.pretraining import initial_global_arrays
from visionfm_core.run_config import RunConfig

OCT = Path(simulations.__file__).parent / "data" / "oct2017_val" / "val"


def _site(root: Path, first: int, count: int) -> Path:
    for src in sorted(OCT.glob("*/*.jpeg"))[first:first + count]:
        (root / src.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / src.parent.name / src.name)
    return root


@pytest.fixture(scope="module")
def replies(tmp_path_factory: pytest.TempPathFactory) -> list[Message]:
    """Train replies of two real sites (different data, different example counts) to one global model."""
    cfg = RunConfig(num_rounds=1, local_steps=1, batch_size=4, arch="nano", image_size=32, patch_size=8,
                    modalities="oct", ssl={"out_dim": 32, "head_hidden_dim": 32, "head_bottleneck_dim": 16,
                                           "local_crops": 0})
    request_content = RecordDict({"arrays": arrays_to_record(initial_global_arrays(cfg)),
                                  "config": ConfigRecord({**cfg.to_flat(), "server-round": 1})})
    out = []
    for node, (first, count) in enumerate([(0, 8), (8, 16)], start=1):
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = node, 1, node
        folder = _site(tmp_path_factory.mktemp(f"site{node}"), first, count)
        context = Context(run_id=1, node_id=node, node_config={"data-path": str(folder), "modalities": "oct"},
                          state=RecordDict(), run_config={})
        request = Message(RecordDict(dict(request_content)), dst_node_id=node, message_type=MessageType.TRAIN)
        reply = client_app(request, context)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        out.append(reply)
    return out


def _expected_mean(replies: list[Message]) -> dict[str, np.ndarray]:
    sites = [(record_to_numpy(r.content.array_records["arrays"]), float(r.content.metric_records["metrics"]
                                                                          ["num-examples"])) for r in replies]
    total = sum(w for _, w in sites)
    return {k: sum(arrays[k].astype(np.float64) * (w / total) for arrays, w in sites) for k in sites[0][0]}


def test_a_stock_fedavg_on_unpacked_replies_gives_the_weighted_mean(replies: list[Message]) -> None:
    expected = _expected_mean(replies)
    counts = [r.content.metric_records["metrics"]["num-examples"] for r in replies]
    assert counts[0] != counts[1]  # the weighting is really exercised
    arrays, metrics = PackedRecordsStrategy(FedAvg()).aggregate_train(1, replies)
    assert all(MANIFEST_KEY in r.content.array_records["arrays"] for r in replies)  # replies left as they were
    assert arrays is not None and metrics is not None
    got = {k: a.numpy() for k, a in arrays.items()}
    assert set(got) == set(expected) and len(got) > 10
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6)


def test_without_the_adapter_a_stock_strategy_averages_the_packing(replies: list[Message]) -> None:
    arrays, _ = FedAvg().aggregate_train(1, replies)
    assert arrays is not None
    # It averaged the flat buffers and the manifest's bytes: no tensor key, an unreadable manifest.
    assert MANIFEST_KEY in arrays and not any(k.startswith("oct/") for k in arrays)
    assert arrays[MANIFEST_KEY].numpy().dtype != np.uint8


def test_unpacking_keeps_every_tensor_and_leaves_plain_records_alone() -> None:
    tensors = {"a/w": np.arange(6, dtype=np.float32).reshape(2, 3), "a/n": np.array([3], dtype=np.int64)}
    record = unpacked_record(arrays_to_record(tensors))
    assert set(record) == set(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(record[key].numpy(), value)
    assert unpacked_record(record) is record
