"""The client's DP entry points driven by a RunConfig: rounds with fresh trainers carry the spending
in local state, report only releasable numbers, and the site stops at its budget."""

from __future__ import annotations

import math

import pytest
import torch

from client.privacy.accountant import PrivacyBudget, PrivacyBudgetExceeded, SiteAccountant
from client.privacy.entry import dp_ssl_loader, new_dp_trainer
from client.privacy.reporting import RELEASABLE_METRICS, releasable_metrics
from strategies.protocol.dp_config import DPConfig
from visionfm_core.data.items import ImageItem
from visionfm_core.errors import ConfigError
from visionfm_core.run_config import RunConfig
from visionfm_core.splits import ModalitySplit


def test_rounds_accumulate_epsilon_in_local_state_until_the_budget_stops_them(
    fundus_items: list[ImageItem],
) -> None:
    cfg = RunConfig(
        arch="nano",
        image_size=32,
        patch_size=8,
        num_rounds=3,
        local_steps=2,
        batch_size=8,
        objective="dino",
        device="cpu",
        ssl={"out_dim": 32, "head_hidden_dim": 32, "head_bottleneck_dim": 16, "local_crops": 1},
    )
    split = ModalitySplit("fundus", train=fundus_items, val=[], num_classes=5)
    dp = DPConfig(noise_multiplier=3.0, center_noise_multiplier=4.0, expected_batch_size=16)
    budget = PrivacyBudget(0.9, 1e-3)  # 5 steps fit: two rounds of 2, not a third
    state: dict[str, torch.Tensor] = {}
    spent: list[float] = []
    for server_round in (1, 2, 3):
        trainer = new_dp_trainer(
            cfg, "fundus", torch.device("cpu"), dp, SiteAccountant(budget), seed_offset=1
        )
        trainer.load_local_state(state)
        try:
            stats = trainer.train_steps(
                dp_ssl_loader(split, cfg, dp),
                cfg.local_steps,
                start_step=(server_round - 1) * cfg.local_steps,
            )
        except PrivacyBudgetExceeded as refused:
            assert server_round == 3 and refused.spent == pytest.approx(spent[-1])
            break
        sent = releasable_metrics(stats)
        assert set(sent) == set(RELEASABLE_METRICS)
        assert "loss" not in sent and "images" not in sent
        spent.append(sent["epsilon"])
        state = trainer.local_state()
    else:
        pytest.fail("the third round should have been refused")
    assert len(spent) == 2 and 0 < spent[0] < spent[1] <= 0.9
    assert all(math.isfinite(e) for e in spent)


def test_dp_settings_come_from_flat_run_config_keys() -> None:
    dp = DPConfig.from_dict(
        {
            "privacy.noise-multiplier": "1.5",
            "max_grad_norm": 0.5,
            "center": "Fixed",
            "microbatch-size": "auto",
            "expected-batch-size": 64,
            "accountant": "prv",
        }
    )
    assert dp == DPConfig(
        noise_multiplier=1.5,
        max_grad_norm=0.5,
        center="fixed",
        microbatch_size=None,
        expected_batch_size=64,
        accountant="prv",
    )
    assert DPConfig.from_dict(dp.to_dict()) == dp
    with pytest.raises(ConfigError, match=r"privacy\.noise"):
        DPConfig.from_dict({"noise": 1.0})
    with pytest.raises(ConfigError, match=r"privacy\.expected-batch-size"):
        DPConfig.from_dict({"expected-batch-size": 2.5})
    with pytest.raises(ConfigError, match=r"privacy\.center"):
        DPConfig(center="local")  # type: ignore[arg-type]
