"""The site's side of federated fine-tuning, through the real ClientApp with real Flower Messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import PERSONAL_HEAD_PREFIX
from client.app import app as client_app
from client.finetuning import finetune_round
from client.site import load_site_tasks
from server.federation.finetune_phase import finetune_arrays, resolve_finetune_task
from strategies.protocol.records import arrays_to_record, record_to_numpy
from strategies.protocol.task_models import CLASSIFIER_PREFIX
from visionfm_core.errors import ConfigError
from visionfm_core.pretraining import initial_global_arrays
from visionfm_core.run_config import RunConfig

BASE = {"num-rounds": 1, "local-steps": 1, "batch-size": 8, "arch": "nano", "image-size": 32, "patch-size": 8,
        "modalities": "fundus", "scenario": "quick", "finetune-rounds": 2, "finetune-batch-size": 32,
        "finetune-min-steps": 0,
        "ssl.out-dim": 32, "ssl.head-hidden-dim": 32, "ssl.head-bottleneck-dim": 16, "ssl.local-crops": 0}


def _config(**changes: object) -> RunConfig:
    return resolve_finetune_task(RunConfig.from_flat({**BASE, **{k.replace("_", "-"): v for k, v in changes.items()}}))


def _global(cfg: RunConfig) -> dict[str, np.ndarray]:
    return finetune_arrays({k: v.numpy() for k, v in initial_global_arrays(cfg).items()}, cfg)


def _message(cfg: RunConfig, arrays: dict[str, np.ndarray], message_type: str, server_round: int = 1) -> Message:
    config = ConfigRecord({**cfg.to_flat(), "server-round": server_round})
    return Message(RecordDict({"arrays": arrays_to_record(arrays), "config": config}), dst_node_id=3,
                   message_type=message_type)


def _context() -> Context:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 3
    return Context(run_id=1, node_id=3, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def _reply(cfg: RunConfig, arrays: dict[str, np.ndarray], context: Context, message_type: str = MessageType.TRAIN,
           server_round: int = 1) -> Message:
    reply = client_app(_message(cfg, arrays, message_type, server_round), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return reply


@pytest.mark.parametrize(("key", "value"), [("finetune-encoder", "thawed"), ("finetune-head", "local"),
                                            ("finetune-task", "captioning"), ("finetune-mode", "multilabel"),
                                            ("finetune-task-config", "{not json"), ("finetune-task-config", "[2]"),
                                            ("finetune-rounds", -1), ("finetune-lr", -1e-3),
                                            ("finetune-lr", float("nan")),
                                            ("finetune-layer-decay", 1.5), ("finetune-layer-decay", -0.5),
                                            ("finetune-min-steps", -2),
                                            ("finetune-classes", "fundus=1"), ("finetune-classes", "fundus")])
def test_bad_finetune_keys_are_rejected_by_name(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as raised:
        RunConfig.from_flat({**BASE, key: value})
    assert raised.value.key == key


def test_init_encoders_without_finetune_rounds_is_an_error() -> None:
    with pytest.raises(ConfigError) as raised:
        RunConfig.from_flat({**BASE, "finetune-rounds": 0, "init-encoders": "somewhere"})
    assert raised.value.key == "init-encoders"


def test_class_counts_come_from_the_scenario_and_round_trip() -> None:
    cfg = _config()
    assert cfg.finetune_class_counts() == {"fundus": 5} and cfg.phase == "finetune"
    assert RunConfig.from_flat(cfg.to_flat()) == cfg


def test_shared_head_and_trained_encoder_come_back_trained_with_validation_scores() -> None:
    cfg = _config(finetune_mode="ordinal")
    sent = _global(cfg)
    assert any(k.startswith(f"fundus/{CLASSIFIER_PREFIX}") for k in sent)
    site = load_site_tasks({"partition-id": 0}, cfg)
    result = finetune_round(site, {k: torch.from_numpy(v) for k, v in sent.items()}, cfg, 1, {})
    assert set(result.arrays) == set(sent)
    for key in ("fundus/classifier.fc.weight", "fundus/backbone.blocks.1.mlp.fc2.weight"):
        assert not np.allclose(result.arrays[key].numpy(), sent[key])
    assert result.metrics["fundus/num-examples"] == len(site["fundus"].train)
    for name in ("val-accuracy", "val-auc", "val-kappa", "finetune-loss"):
        assert np.isfinite(result.metrics[f"fundus/{name}"]), name
    assert result.local_heads == {}


def test_frozen_encoder_is_not_sent_back() -> None:
    cfg = _config(finetune_encoder="frozen")
    reply = _reply(cfg, _global(cfg), _context())
    sent = record_to_numpy(reply.content.array_records["arrays"])
    assert sent and all(k.startswith(f"fundus/{CLASSIFIER_PREFIX}") for k in sent)
    # BatchNorm's integer step counter is site bookkeeping, never averaged.
    assert all(v.dtype == np.float32 for v in sent.values())


def test_personal_head_stays_on_the_site_and_is_reused_next_round() -> None:
    cfg = _config(finetune_head="personal")
    arrays = _global(cfg)
    assert not any(CLASSIFIER_PREFIX in k for k in arrays)  # the server never holds a personal head
    context = _context()
    reply = _reply(cfg, arrays, context)
    sent = record_to_numpy(reply.content.array_records["arrays"])
    assert sent and all(k.startswith("fundus/backbone.") for k in sent)
    head = record_to_numpy(context.state.array_records[PERSONAL_HEAD_PREFIX + "fundus"])
    # Not a single head tensor's bytes appear anywhere in the serialised reply.
    payload = b"".join(record.deflate() for record in reply.content.values()) + reply.content.deflate()
    for value in head.values():
        assert value.tobytes()[:64] not in payload
    # Next round, at a vanishing learning rate, training continues from the stored head (a fresh head
    # would be far from it).
    still = cfg.replace(finetune_lr=1e-12)
    _reply(still, arrays, context, server_round=2)
    again = record_to_numpy(context.state.array_records[PERSONAL_HEAD_PREFIX + "fundus"])
    assert np.abs(head["fc.weight"]).max() > 1e-3  # trained well away from the fresh head's 2e-5 scale
    for key, value in head.items():
        np.testing.assert_allclose(again[key], value, atol=1e-4)
    # Evaluation scores the global encoder with the site's personal head.
    evaluated = _reply(cfg, arrays, context, MessageType.EVALUATE)
    metrics = {k: float(v) for k, v in evaluated.content.metric_records["metrics"].items()}  # type: ignore[arg-type]
    assert 0.0 <= metrics["fundus/accuracy"] <= 1.0 and metrics["fundus/num-examples"] > 0
    assert not evaluated.content.array_records


def test_server_averages_shared_heads_by_examples_and_rejects_a_misshapen_one(tmp_path) -> None:
    from flwr.app import Array

    from server.federation.finetune_phase import FineTunePhase
    from strategies.fedavg import ModalityAccumulator

    cfg = _config(out_dir=str(tmp_path))
    phase = FineTunePhase(None, cfg, {k: v.numpy() for k, v in initial_global_arrays(cfg).items()},  # type: ignore[arg-type]
                          round_offset=1)
    replies = []
    for partition in (0, 1):
        context = _context()
        context.node_config["partition-id"] = partition
        replies.append(client_app(_message(phase.cfg, phase.arrays, MessageType.TRAIN), context))
    updates = [phase._site_update(1, f"site-{i}", reply) for i, reply in enumerate(replies)]
    accumulator = ModalityAccumulator()
    for update in updates:
        assert update is not None
        accumulator.add(update)
    key = "fundus/classifier.fc.weight"
    weights = [u.num_examples["fundus"] for u in updates if u is not None]
    expected = sum(w * u.arrays[key] for w, u in zip(weights, updates, strict=True) if u is not None) / sum(weights)
    np.testing.assert_allclose(accumulator.result()[key], expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(updates[0].arrays[key], updates[1].arrays[key])  # type: ignore[union-attr]
    rows = phase.metrics.select(phase="finetune", round=2)
    assert {r["site"] for r in rows} == {"site-0", "site-1"} and all(r["finetune_round"] == 1 for r in rows)
    replies[0].content.array_records["arrays"]["fundus/classifier.fc.bias"] = Array(np.zeros(7, np.float32))
    assert phase._site_update(1, "site-0", replies[0]) is None  # round 1's reply: a later round's would be stale
    assert "fundus/classifier.fc.bias" in phase.rejected[-1] and "site-0" in phase.rejected[-1]
