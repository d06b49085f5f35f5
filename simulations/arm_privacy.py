"""The privacy budget and ledger of a non-federated arm, so `--mode all` compares DP arms at equal budgets.

Local-only: each simulated site trains alone within its own scenario budget, charged to its own ledger
(`<arm folder>/sites/site-<i>/privacy`), as in the federated arm. Centralized: the pooled data holds
the images of every site holding a modality, so each modality trains within the strictest budget of
those sites (smallest epsilon and delta), charged to one ledger (`<arm folder>/sites/pooled/privacy`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from client.privacy.accountant import PrivacyBudget
from client.privacy.charging import LedgerScope
from client.privacy.ledger import LedgerBook
from client.privacy.site import DEFAULT_DELTA, simulated_site_folder
from strategies.protocol.scenario import Scenario
from visionfm_core.errors import ConfigError
from visionfm_core.run_config import RunConfig


@dataclass(frozen=True)
class ArmPrivacy:
    """What a DP arm trains within and where it is charged."""

    budget: PrivacyBudget
    ledger: LedgerScope
    per_modality: dict[str, PrivacyBudget] = field(default_factory=dict)

    def budget_for(self, modality: str) -> PrivacyBudget:
        return self.per_modality.get(modality, self.budget)


def require_site_budgets(scenario: Scenario) -> None:
    """Under DP every simulated site needs a budget; the error names the first site without one."""
    for index, site in enumerate(scenario.sites):
        if site.privacy_epsilon is None:
            raise ConfigError(f"sites[{index}].privacy-epsilon",
                              f"dp = true: site {site.name!r} has no privacy budget (visionfm simulate "
                              "--privacy-epsilon E, or the scenario's [privacy] table)")


def site_budget_of(scenario: Scenario, index: int) -> PrivacyBudget:
    site = scenario.sites[index]
    require_site_budgets(scenario)
    return PrivacyBudget(float(site.privacy_epsilon or 0.0), site.privacy_delta or DEFAULT_DELTA)


def local_privacy(scenario: Scenario, cfg: RunConfig, arm_dir: Path, index: int) -> ArmPrivacy | None:
    if not cfg.dp:
        return None
    folder = simulated_site_folder(arm_dir, index) / "privacy"
    return ArmPrivacy(site_budget_of(scenario, index), LedgerScope(LedgerBook(folder)))


def pooled_privacy(scenario: Scenario, cfg: RunConfig, arm_dir: Path) -> ArmPrivacy | None:
    if not cfg.dp:
        return None
    def strictest(indices: list[int]) -> PrivacyBudget:
        budgets = [site_budget_of(scenario, i) for i in indices]
        return PrivacyBudget(min(b.epsilon for b in budgets), min(b.delta for b in budgets))

    per_modality = {m: strictest([i for i, s in enumerate(scenario.sites) if m in s.modalities])
                    for m in scenario.modalities}
    return ArmPrivacy(strictest(list(range(len(scenario.sites)))),
                      LedgerScope(LedgerBook(arm_dir / "sites" / "pooled" / "privacy")), per_modality)
