"""A site's DP-SGD round through client/training.py: epsilon is reported, un-noised statistics are not,
and a round that would exceed the site's budget is refused and sends nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.privacy.accountant import PrivacyBudget
from client.privacy.charging import LedgerScope
from client.privacy.ledger import LedgerBook
from client.training import train_round
from strategies.protocol.scenario import load_scenario, site_data
from visionfm_core.errors import ConfigError
from visionfm_core.pretraining import initial_global_arrays
from visionfm_core.run_config import RunConfig

CFG = RunConfig(num_rounds=2, local_steps=1, batch_size=8, arch="nano", image_size=32, patch_size=8,
                modalities="fundus", dp=True, scenario="quick",
                ssl={"out_dim": 32, "head_hidden_dim": 32, "head_bottleneck_dim": 16, "local_crops": 0},
                privacy={"noise_multiplier": 1.0, "max_grad_norm": 1.0, "expected_batch_size": 8})


@pytest.fixture(scope="module")
def site() -> dict:
    data = site_data(load_scenario("quick"), 0, 0.2)
    data["fundus"].train = data["fundus"].train[:64]
    return {"fundus": data["fundus"]}


def test_dp_round_reports_epsilon_and_no_unnoised_statistics(site: dict, tmp_path: Path) -> None:
    result = train_round(site, initial_global_arrays(CFG), CFG, 1, {}, budget=PrivacyBudget(8.0, 1e-5),
                         ledger=LedgerScope(LedgerBook(tmp_path)))
    assert 0 < result.metrics["fundus/epsilon"] <= 8.0
    assert "fundus/loss" not in result.metrics and "fundus/images_per_s" not in result.metrics
    assert any(k.startswith("fundus/backbone.") for k in result.arrays)
    # The accountant's history stays on the site for the next round.
    assert any("privacy" in k for k in result.local_state["fundus"])


def test_round_past_the_budget_is_refused_and_sends_nothing(site: dict, tmp_path: Path) -> None:
    result = train_round(site, initial_global_arrays(CFG), CFG, 1, {}, budget=PrivacyBudget(0.01, 1e-5),
                         ledger=LedgerScope(LedgerBook(tmp_path)))
    assert result.metrics["fundus/budget-exhausted"] == 1.0
    assert result.arrays == {}
    assert not list(tmp_path.glob("*.jsonl"))  # refused before anything was charged


def test_dp_run_without_a_site_budget_is_a_named_config_error(site: dict) -> None:
    with pytest.raises(ConfigError, match="privacy-epsilon"):
        train_round(site, initial_global_arrays(CFG), CFG, 1, {}, budget=None)


def test_dp_run_without_a_ledger_is_a_named_config_error(site: dict) -> None:
    with pytest.raises(ConfigError, match="privacy-ledger-dir"):
        train_round(site, initial_global_arrays(CFG), CFG, 1, {}, budget=PrivacyBudget(8.0, 1e-5))
