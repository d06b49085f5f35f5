"""A site's federated round on two gloo workers (what `devices = 2` in the node config runs): one
update with the single-device round's keys and shapes, the site's whole image count, both workers
ending with the same weights; DP-SGD is refused on more than one device."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from client.app import _train_worker
from client.training import RoundResult, train_round
from strategies.protocol.scenario import load_scenario, site_data
from visionfm_core.distributed import DistContext, launch
from visionfm_core.errors import ConfigError
from visionfm_core.pretraining import initial_global_arrays
from visionfm_core.run_config import RunConfig

CFG = RunConfig(num_rounds=2, local_steps=2, batch_size=4, arch="nano", image_size=32, patch_size=8,
                modalities="fundus", scenario="quick", device="cpu",
                ssl={"out_dim": 32, "head_hidden_dim": 32, "head_bottleneck_dim": 16, "local_crops": 0})


def _site() -> dict[str, Any]:
    data = site_data(load_scenario("quick"), 0, 0.2)
    data["fundus"].train = data["fundus"].train[:32]
    return {"fundus": data["fundus"]}


def _both_ranks(ctx: DistContext, site: dict[str, Any], arrays: dict[str, torch.Tensor]) -> list[RoundResult]:
    """Every worker's result, gathered on all of them (to check they agree)."""
    result = _train_worker(ctx, site, arrays, CFG, 1, {}, 1)
    gathered: list[Any] = [None] * ctx.world_size
    torch.distributed.all_gather_object(gathered, result.arrays)
    return gathered


def test_two_workers_send_one_update_of_the_same_shape_and_agree() -> None:
    site, arrays = _site(), initial_global_arrays(CFG)
    single = train_round(site, arrays, CFG, 1, {}, site_seed=1)
    ranks = launch(_both_ranks, (site, arrays), world_size=2, device="cpu")
    assert {k: v.shape for k, v in ranks[0].items()} == {k: v.shape for k, v in single.arrays.items()}
    for key, value in ranks[0].items():
        torch.testing.assert_close(ranks[1][key], value, rtol=0, atol=0, msg=key)  # identical on both workers
    assert any(not torch.equal(ranks[0][k], arrays[k]) for k in ranks[0])  # and trained
    multi = launch(_train_worker, (site, arrays, CFG, 1, {}, 1), world_size=2, device="cpu")
    assert multi.metrics["fundus/num-examples"] == 32.0 and multi.metrics["fundus/devices"] == 2.0
    assert multi.metrics["fundus/loss"] > 0 and set(multi.local_state) == {"fundus"}


def test_dp_sgd_on_several_devices_is_refused() -> None:
    ctx = DistContext(rank=0, world_size=2, backend="gloo")
    with pytest.raises(ConfigError, match="devices"):
        train_round(_site(), {}, CFG.replace(dp=True), 1, {}, dist=ctx)
