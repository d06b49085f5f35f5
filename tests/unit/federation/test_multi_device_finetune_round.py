"""A federated fine-tuning round on a site with two gloo workers (node config `devices = 2`): through the
real ClientApp one reply with the one-device reply's keys and shapes and the site's whole image count;
both workers end with the same weights; DP-SGD is refused on more than one device."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from client.app import _finetune_worker
from client.finetuning import finetune_round
from client.site import load_site_tasks
from strategies.protocol.records import record_to_numpy
from tests.unit.federation.test_finetuning import _config, _context, _global, _reply
from visionfm_core.distributed import DistContext, launch
from visionfm_core.errors import ConfigError


def test_a_two_worker_site_sends_one_update_shaped_like_a_one_device_site() -> None:
    cfg = _config(finetune_batch_size=16)
    arrays = _global(cfg)
    single = record_to_numpy(_reply(cfg, arrays, _context()).content.array_records["arrays"])
    context = _context()
    context.node_config["devices"] = 2
    reply = _reply(cfg, arrays, context)
    sent = record_to_numpy(reply.content.array_records["arrays"])
    assert {k: v.shape for k, v in sent.items()} == {k: v.shape for k, v in single.items()}
    assert all(not np.allclose(sent[k], arrays[k]) for k in ("fundus/classifier.fc.weight",
                                                              "fundus/backbone.blocks.1.mlp.fc2.weight"))
    metrics = reply.content.metric_records["metrics"]
    site = load_site_tasks({"partition-id": 0}, cfg)
    assert metrics["fundus/devices"] == 2.0 and metrics["fundus/num-examples"] == len(site["fundus"].train)
    assert np.isfinite(float(metrics["fundus/finetune-loss"])) and np.isfinite(float(metrics["fundus/val-auc"]))  # type: ignore[arg-type]


def _every_worker(ctx: DistContext, site: dict[str, Any], arrays: dict[str, torch.Tensor], cfg: Any) -> list[Any]:
    result = _finetune_worker(ctx, site, arrays, cfg, 1, {}, 1)
    gathered: list[Any] = [None] * ctx.world_size
    torch.distributed.all_gather_object(gathered, (result.arrays, result.metrics))
    return gathered


def test_both_workers_end_the_round_with_the_same_weights_and_scores() -> None:
    cfg = _config(finetune_batch_size=8)
    site = load_site_tasks({"partition-id": 0}, cfg)
    site["fundus"].train, site["fundus"].val = site["fundus"].train[:32], site["fundus"].val[:12]
    arrays = {k: torch.from_numpy(v) for k, v in _global(cfg).items()}
    (first, first_metrics), (second, second_metrics) = launch(_every_worker, (site, arrays, cfg), world_size=2,
                                                              device="cpu")
    assert set(first) == set(arrays)
    for key, value in first.items():
        assert torch.equal(second[key], value), key
    # The validation scores, decided by the main worker, and the whole batch's loss are the same everywhere.
    assert first_metrics == second_metrics and first_metrics["fundus/steps"] == 2.0  # 16 images a worker, 8 a step


def test_dp_sgd_on_several_devices_is_refused() -> None:
    ctx = DistContext(rank=0, world_size=2, backend="gloo")
    with pytest.raises(ConfigError, match="devices"):
        finetune_round({}, {}, _config(dp=True), 1, {}, budget=None, ledger=None, dist=ctx)
