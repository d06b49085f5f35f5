"""Charging a DP round to the site's lifetime ledger before it trains (pretraining and fine-tuning)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from client.privacy.accountant import PrivacyBudget, SiteAccountant
from client.privacy.ledger import Charge, LedgerBook
from client.privacy.sampling import PoissonLoader
from strategies.protocol.dp_config import DPConfig
from visionfm_core.errors import ConfigError
from visionfm_core.run_config import RunConfig


@dataclass(frozen=True)
class LedgerScope:
    """Where a DP round is charged: the site's ledger book, and the run (for the audit's per-run view)."""

    book: LedgerBook
    run: int = 0


def require_ledger(cfg: RunConfig, budget: PrivacyBudget | None, ledger: LedgerScope | None) -> None:
    """A DP round needs the site's own budget and its lifetime ledger; errors name the node-config key."""
    if not cfg.dp:
        return
    if budget is None:
        raise ConfigError("privacy-epsilon", "the run uses DP-SGD: set this site's privacy budget in its node config")
    if ledger is None:
        raise ConfigError("privacy-ledger-dir", "the run uses DP-SGD: the site needs its privacy ledger folder "
                                                "(visionfm-client join sets <work>/privacy)")


def charge_round(ledger: LedgerScope, budget: PrivacyBudget, dp: DPConfig, modality: str, members: list[str],
                 phase: str, server_round: int, noise_multiplier: float, loader: PoissonLoader[Any],
                 steps: int) -> SiteAccountant:
    """Record the round in the ledger before it trains (PrivacyBudgetExceeded when it would overshoot the
    site's lifetime budget); returns the accountant the trainer spends through."""
    if budget.delta >= 1.0 / loader.dataset_size:  # checked before charging: a refused setting costs nothing
        raise ConfigError("privacy.delta", f"{budget.delta:g} is not below 1/{loader.dataset_size} "
                                           "(one over the number of training samples)")
    charge = Charge(ledger.run, phase, server_round, noise_multiplier, loader.sample_rate, steps, modality)
    return ledger.book.charge(members, modality, charge, budget, dp.accountant, label=f"{modality} data")
