"""Privacy in the fine-tuning phase, through the real ClientApp with real Flower Messages and contexts:
DP-SGD fine-tuning is charged to the site's lifetime ledger (after its pretraining), clips and reports
epsilon only; central DP clips fine-tuning updates at the site; under secure aggregation a fine-tuning
reply carries no weights; under DP, evaluation sends nothing about the site's data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app
from client.finetuning import finetune_round
from client.privacy.accountant import PrivacyBudget
from client.privacy.charging import LedgerScope
from client.privacy.ledger import LedgerBook, summarise_ledgers
from client.site import load_site_tasks
from server.federation.finetune_phase import finetune_arrays, resolve_finetune_task
from strategies.protocol.records import arrays_to_record, record_to_numpy
from strategies.protocol.secagg_stages import PENDING
from visionfm_core.pretraining import initial_global_arrays
from visionfm_core.run_config import RunConfig

BASE = {"num-rounds": 1, "local-steps": 1, "batch-size": 8, "arch": "nano", "image-size": 32, "patch-size": 8,
        "modalities": "fundus", "scenario": "quick", "finetune-rounds": 2, "finetune-batch-size": 16,
        "ssl.out-dim": 32, "ssl.head-hidden-dim": 32, "ssl.head-bottleneck-dim": 16, "ssl.local-crops": 0,
        "finetune-encoder": "frozen"}
DP = {"dp": True, "privacy.noise-multiplier": 1.0, "privacy.expected-batch-size": 16, "privacy.center": "fixed"}


def _config(**changes: object) -> RunConfig:
    return resolve_finetune_task(RunConfig.from_flat({**BASE, **changes}))


def _global(cfg: RunConfig) -> dict[str, np.ndarray]:
    return finetune_arrays({k: v.numpy() for k, v in initial_global_arrays(cfg).items()}, cfg)


def _context(work: Path, run: int = 1, epsilon: float | None = 50.0) -> Context:
    """A site's context; `epsilon=None`: a site without a DP budget (one with a budget joins DP runs only)."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = run, run, 3
    config: dict[str, str | int | float] = {"partition-id": 0, "privacy-ledger-dir": str(work / "privacy")}
    if epsilon is not None:
        config.update({"privacy-epsilon": epsilon, "privacy-delta": 1e-5})
    return Context(run_id=run, node_id=3, node_config=config, state=RecordDict(), run_config={})


def _call(cfg: RunConfig, arrays: dict[str, np.ndarray], context: Context, message_type: str = MessageType.TRAIN,
          server_round: int = 1) -> Message:
    config = ConfigRecord({**cfg.to_flat(), "server-round": server_round})
    request = Message(RecordDict({"arrays": arrays_to_record(arrays), "config": config}), dst_node_id=3,
                      message_type=message_type)
    return client_app(request, context)


def test_dp_finetuning_clips_reports_epsilon_only_and_charges_the_ledger(tmp_path: Path) -> None:
    cfg = _config(**DP, **{"privacy.max-grad-norm": 1e-4})
    context = _context(tmp_path)
    pretrain = _call(cfg.replace(phase="pretrain"), {k: v.numpy() for k, v in initial_global_arrays(cfg).items()},
                     context)
    assert not pretrain.has_error(), pretrain.error.reason if pretrain.has_error() else ""
    reply = _call(cfg, _global(cfg), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = dict(reply.content.metric_records["metrics"])
    pretrain_epsilon = pretrain.content.metric_records["metrics"]["fundus/epsilon"]
    # Fine-tuning composes with pretraining on the same images: the epsilon reported grows from there.
    assert metrics["fundus/epsilon"] > pretrain_epsilon > 0
    assert metrics["fundus/epsilon_budget"] == 50.0
    assert not any(k.endswith(("finetune-loss", "/loss")) or "/val-" in k for k in metrics)
    sent = record_to_numpy(reply.content.array_records["arrays"])
    assert sent and all("/classifier." in k for k in sent)  # the head only (frozen encoder)
    (spending,) = [s for s in summarise_ledgers(tmp_path / "privacy") if s.entries == 2]
    assert [r.phases for r in spending.runs] == [["finetune", "pretrain"]]
    assert spending.epsilon_spent == pytest.approx(metrics["fundus/epsilon"], rel=1e-6)


def test_dp_finetuning_clips_every_sample(tmp_path: Path) -> None:
    cfg = _config(**DP, **{"privacy.max-grad-norm": 1e-6})
    site = load_site_tasks({"partition-id": 0}, cfg)
    arrays = {k: torch.from_numpy(v) for k, v in _global(cfg).items()}
    result = finetune_round(site, arrays, cfg, 1, {}, budget=PrivacyBudget(50.0, 1e-5),
                            ledger=LedgerScope(LedgerBook(tmp_path), run=9))
    stats = result.local_stats["fundus"]
    assert stats["clipped_fraction"] == 1.0  # every per-sample gradient was above the bound and clipped
    assert result.metrics["fundus/epsilon"] > 0 and "fundus/clipped_fraction" not in result.metrics


def test_dp_finetuning_past_the_lifetime_budget_is_refused_before_training(tmp_path: Path) -> None:
    cfg = _config(**DP)
    reply = _call(cfg, _global(cfg), _context(tmp_path, epsilon=0.05))
    metrics = reply.content.metric_records["metrics"]
    assert metrics["fundus/budget-exhausted"] == 1.0
    assert record_to_numpy(reply.content.array_records["arrays"]) == {}
    assert summarise_ledgers(tmp_path / "privacy") == []  # nothing charged, nothing trained


# The task's least steps (300 for classification) are not what these tests look at: one epoch is enough
# to make an update for the site to clip or to keep (the steps are tested in test_finetune_recipe.py).
ONE_EPOCH = {"finetune-min-steps": 0}


def test_central_dp_clips_finetuning_updates_at_the_site(tmp_path: Path) -> None:
    clip = 1e-3
    cfg = _config(**{"central-dp-clip": clip, "central-dp-noise": 1.0, "finetune-encoder": "trained", **ONE_EPOCH})
    arrays = _global(cfg)
    reply = _call(cfg, arrays, _context(tmp_path, epsilon=None))
    sent = record_to_numpy(reply.content.array_records["arrays"])
    assert any("/backbone." in k for k in sent) and any("/classifier." in k for k in sent)
    norm = np.sqrt(sum(float(np.sum((sent[k].astype(np.float64) - arrays[k]) ** 2)) for k in sent))
    assert norm == pytest.approx(clip, rel=1e-3)


def test_secure_aggregation_keeps_the_finetuning_update_on_the_site(tmp_path: Path) -> None:
    cfg = _config(**{"secure-aggregation": True, **ONE_EPOCH})
    context = _context(tmp_path, epsilon=None)
    reply = _call(cfg, _global(cfg), context)
    assert record_to_numpy(reply.content.array_records["arrays"]) == {}
    pending = context.state.array_records[PENDING]
    assert pending and all("/classifier." in k for k in pending)


@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_evaluation_under_dp_sends_nothing_about_the_site(tmp_path: Path, phase: str) -> None:
    cfg = _config(**DP).replace(phase=phase)
    arrays = _global(cfg) if phase == "finetune" else {k: v.numpy() for k, v in initial_global_arrays(cfg).items()}
    reply = _call(cfg, arrays, _context(tmp_path), MessageType.EVALUATE)
    assert not reply.has_error()
    assert dict(reply.content.metric_records["metrics"]) == {"dp-withheld": 1.0}
    assert record_to_numpy(reply.content.array_records["arrays"]) == {} if reply.content.array_records else True
    plain = _call(cfg.replace(dp=False), arrays, _context(tmp_path, epsilon=None), MessageType.EVALUATE)
    assert len(dict(plain.content.metric_records["metrics"])) > 2  # without DP a site without a budget scores
    refused = _call(cfg.replace(dp=False), arrays, _context(tmp_path), MessageType.EVALUATE)
    assert refused.has_error()  # a site with a budget releases nothing outside DP


def test_the_server_clips_again_under_central_dp_so_an_unclipped_site_cannot_break_epsilon(tmp_path: Path) -> None:
    from server.federation.rounds import Federation
    from strategies.fedavg import SiteReply

    cfg = RunConfig(central_dp_clip=0.5, central_dp_noise=1.0, out_dir=str(tmp_path))
    reference = {"fundus/backbone.w": np.zeros(16, np.float32), "fundus/backbone.b": np.ones(4, np.float32)}
    federation = Federation(None, cfg, reference)  # type: ignore[arg-type]  # no messaging needed here
    greedy = SiteReply("site", {"fundus/backbone.w": np.full(16, 3.0, np.float32),
                                "fundus/backbone.b": np.full(4, 2.0, np.float32)}, {"fundus": 1})
    clipped = federation._central_dp_clipped(greedy)
    norm = np.sqrt(sum(float(np.sum((clipped.arrays[k] - reference[k]) ** 2)) for k in reference))
    assert norm == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize(("changes", "named"), [
    ({"strategy": "median"}, "strategy = median"), ({"strategy": "trimmed-mean"}, "strategy = trimmed-mean"),
    ({"strategy": "krum"}, "strategy = krum"), ({"compression": "int8"}, "compression = int8")])
def test_secure_aggregation_refuses_what_needs_individual_updates_naming_both_keys(
        changes: dict[str, str], named: str) -> None:
    from visionfm_core.errors import ConfigError

    with pytest.raises(ConfigError) as raised:
        RunConfig.from_flat({**BASE, "secure-aggregation": True, **changes})
    assert "secure-aggregation = true" in str(raised.value) and named in str(raised.value)
    # Bounding each update works on masked sums: it is done at the site, and allowed.
    RunConfig.from_flat({**BASE, "secure-aggregation": True, "max-update-norm": 5.0, "finetune-rounds": 2})
