"""A site's privacy settings from its own node config: its lifetime budget and its ledger folder.

Both come from the site, never from the coordinator's run config (a server could otherwise raise the
budget or point the ledger elsewhere). A deployed site sets them with `visionfm-client join`
(`--privacy-epsilon`, `--privacy-delta`; the ledger in `<work>/privacy`). A simulated site's budget is
its scenario entry's (`privacy-epsilon`, or the scenario's `[privacy]` table), and its ledger lives in
the simulation's folder (`<out-dir>/sites/site-<i>/privacy`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from client.node_keys import LEDGER_DIR_KEY, STATE_DIR_KEY
from client.privacy.accountant import PrivacyBudget
from visionfm_core.errors import ConfigError
from visionfm_core.run_config import RunConfig

DEFAULT_DELTA = 1e-5


def simulated_site_folder(out_dir: str | Path, site_index: int) -> Path:
    """Where a simulated site keeps what a real one keeps in its work folder."""
    return Path(out_dir) / "sites" / f"site-{site_index}"


def site_budget(node_config: Mapping[str, Any], cfg: RunConfig) -> PrivacyBudget:
    """The site's lifetime (epsilon, delta): node config in deployment, the scenario in simulation."""
    if "privacy-epsilon" in node_config or "partition-id" not in node_config:
        config = dict(node_config)
        config.setdefault("privacy-delta", DEFAULT_DELTA)
        return PrivacyBudget.from_node_config(config)
    from strategies.protocol.scenario import load_scenario

    index = int(node_config["partition-id"])
    site = load_scenario(cfg.scenario).sites[index]
    if site.privacy_epsilon is None:
        raise ConfigError(f"sites[{index}].privacy-epsilon",
                          "the run uses DP-SGD: give the simulated sites a budget (visionfm simulate "
                          "--privacy-epsilon, or the scenario's [privacy] table)")
    return PrivacyBudget(site.privacy_epsilon, site.privacy_delta or DEFAULT_DELTA)


def ledger_folder(node_config: Mapping[str, Any], cfg: RunConfig) -> Path:
    """The site's ledger folder: `privacy-ledger-dir`, else next to its `state-dir` (both in the work
    folder), else (simulation) the simulated site's folder."""
    if LEDGER_DIR_KEY in node_config:
        return Path(str(node_config[LEDGER_DIR_KEY]))
    if STATE_DIR_KEY in node_config:
        return Path(str(node_config[STATE_DIR_KEY])).parent / "privacy"
    if "partition-id" in node_config:
        return simulated_site_folder(cfg.out_dir, int(node_config["partition-id"])) / "privacy"
    raise ConfigError(LEDGER_DIR_KEY, "the run uses DP-SGD: set this site's privacy ledger folder")
