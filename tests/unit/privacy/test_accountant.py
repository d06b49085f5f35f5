"""SiteAccountant against Opacus' own accountants, budget enforcement, and its serialised state."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from client.privacy.accountant import (
    PrivacyBudget,
    PrivacyBudgetExceeded,
    SiteAccountant,
    combined_noise_multiplier,
    epsilon_of,
)
from visionfm_core.errors import CheckpointError, ConfigError

# Two rounds at one mechanism, one round at another, then back: a history Opacus builds step by step.
ROUNDS = [(1.1, 0.02, 30), (1.1, 0.02, 20), (0.8, 0.05, 10), (1.1, 0.02, 5)]


def _opacus_epsilon(accountant: RDPAccountant | PRVAccountant, delta: float) -> float:
    for sigma, rate, steps in ROUNDS:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=rate)
    return float(accountant.get_epsilon(delta=delta))


def test_epsilon_equals_opacus_rdp_accountant_stepped_one_step_at_a_time() -> None:
    site = SiteAccountant(PrivacyBudget(50.0, 1e-5))
    for sigma, rate, steps in ROUNDS:
        site.spend(sigma, rate, steps)
    expected = _opacus_epsilon(RDPAccountant(), 1e-5)
    assert site.epsilon_spent() == pytest.approx(expected, rel=1e-12)
    assert site.history == [(1.1, 0.02, 50), (0.8, 0.05, 10), (1.1, 0.02, 5)]
    assert site.steps == 65


def test_epsilon_equals_opacus_prv_accountant() -> None:
    site = SiteAccountant(PrivacyBudget(50.0, 1e-5), mechanism="prv")
    for sigma, rate, steps in ROUNDS:
        site.spend(sigma, rate, steps)
    expected = _opacus_epsilon(PRVAccountant(), 1e-5)
    assert site.epsilon_spent() == pytest.approx(expected, rel=1e-9)
    # PRV is the tighter of the two.
    assert site.epsilon_spent() < epsilon_of(site.history, 1e-5, "rdp")


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_noise_multiplier_search_agrees_with_opacus_get_noise_multiplier() -> None:
    site = SiteAccountant(PrivacyBudget(3.0, 1e-5))
    sigma = site.noise_multiplier_for(sample_rate=0.01, steps=500)
    assert sigma == get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.01, steps=500)
    assert site.can_train(500, sigma, 0.01)
    assert not site.can_train(500, sigma * 0.95, 0.01)
    # With spending already on the books, the search covers the whole history and still lands on the budget.
    site.spend(sigma, 0.01, 200)
    rest = site.noise_multiplier_for(sample_rate=0.01, steps=300)
    assert rest == pytest.approx(sigma, rel=2e-2)
    assert 2.97 < site.epsilon_after(300, rest, 0.01) <= 3.0


def test_a_round_that_would_overshoot_is_refused_before_anything_is_spent() -> None:
    site = SiteAccountant(PrivacyBudget(5.0, 1e-5), label="site A")
    site.spend(1.0, 0.05, 40)
    spent = site.epsilon_spent()
    assert 0 < spent < 5.0
    allowed = site.remaining_steps(1.0, 0.05)
    assert site.can_train(allowed, 1.0, 0.05)
    assert not site.can_train(allowed + 1)  # defaults to the last mechanism
    with pytest.raises(PrivacyBudgetExceeded) as info:
        site.check(allowed + 1)
    message = str(info.value)
    assert "site A" in message and "epsilon=5" in message and "delta=1e-05" in message
    assert f"{spent:.4g}" in message
    assert info.value.spent == spent and info.value.projected > 5.0
    assert site.epsilon_spent() == spent and site.steps == 40


def test_no_noise_means_infinite_epsilon_and_only_an_unlimited_budget_allows_it() -> None:
    assert SiteAccountant(PrivacyBudget(10.0, 1e-5)).can_train(1, 0.0, 0.1) is False
    unlimited = SiteAccountant(PrivacyBudget(math.inf, 1e-5))
    assert unlimited.can_train(1, 0.0, 0.1)
    unlimited.spend(0.0, 0.1, 1)
    assert unlimited.epsilon_spent() == math.inf


def test_combined_noise_multiplier_is_the_single_mechanism_equivalent() -> None:
    assert combined_noise_multiplier(1.3) == pytest.approx(1.3)
    assert combined_noise_multiplier(2.0, 2.0) == pytest.approx(2.0 / math.sqrt(2.0))
    assert combined_noise_multiplier(1.0, 2.0, 2.0) == pytest.approx(1.0 / math.sqrt(1.5))
    assert combined_noise_multiplier(1.0, 0.0) == 0.0


def test_history_round_trips_through_tensors_and_json() -> None:
    site = SiteAccountant(PrivacyBudget(8.0, 1e-6))
    for sigma, rate, steps in ROUNDS:
        site.spend(sigma, rate, steps)
    state = site.state_tensors()
    assert state["privacy.history"].dtype == torch.float64 and state["privacy.history"].shape == (3, 3)
    restored = SiteAccountant(PrivacyBudget(8.0, 1e-6))
    restored.load_state_tensors(state)
    assert restored.history == site.history
    assert restored.epsilon_spent() == site.epsilon_spent()
    again = SiteAccountant.from_json(site.to_json())
    assert again.history == site.history and again.budget == site.budget
    empty = SiteAccountant(PrivacyBudget(8.0, 1e-6))
    empty.load_state_tensors(SiteAccountant(PrivacyBudget(8.0, 1e-6)).state_tensors())
    assert empty.history == [] and empty.epsilon_spent() == 0.0


def test_malformed_state_and_settings_are_named() -> None:
    site = SiteAccountant(PrivacyBudget(8.0, 1e-6))
    with pytest.raises(CheckpointError, match=r"privacy\.history"):
        site.load_state_tensors({"privacy.history": torch.zeros(2, 2, dtype=torch.float64)})
    with pytest.raises(CheckpointError, match="bad entry"):
        site.load_state_tensors({"privacy.history": torch.tensor([[1.0, 1.5, 3.0]], dtype=torch.float64)})
    with pytest.raises(ConfigError, match=r"privacy\.epsilon"):
        PrivacyBudget(0.0, 1e-5)
    with pytest.raises(ConfigError, match=r"privacy\.delta"):
        PrivacyBudget(1.0, 1.0)
    with pytest.raises(ConfigError, match=r"privacy\.sample-rate"):
        site.spend(1.0, 0.0, 1)
    with pytest.raises(ConfigError, match=r"privacy\.noise-multiplier"):
        site.can_train(3)  # nothing spent yet, so no mechanism to default to
    with pytest.raises(ConfigError, match=r"privacy\.accountant"):
        SiteAccountant(PrivacyBudget(1.0, 1e-5), mechanism="gdp")  # type: ignore[arg-type]


def test_budget_comes_from_the_site_node_config() -> None:
    budget = PrivacyBudget.from_node_config({"privacy-epsilon": "4", "privacy-delta": 1e-6, "data-path": "x"})
    assert budget == PrivacyBudget(4.0, 1e-6)
    with pytest.raises(ConfigError, match="privacy-delta"):
        PrivacyBudget.from_node_config({"privacy-epsilon": 4})
    with pytest.raises(ConfigError, match="privacy-epsilon"):
        PrivacyBudget.from_node_config({"privacy-epsilon": "lots", "privacy-delta": 1e-6})
