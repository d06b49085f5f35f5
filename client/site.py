"""Which images a site trains and validates on, per modality.

In deployment the site is described by its node config (`data-path`, `modalities`); in simulation by
`partition-id` plus the run's scenario. Either way the result is the same: per modality, labelled or
unlabelled items split into train and validation (patient-grouped where patient keys exist). Nothing
here is ever sent: only counts leave the site.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from simulations.scenario import load_scenario, site_data
from visionfm_core.errors import ConfigError
from visionfm_core.modalities import canonical_modality
from visionfm_core.run_config import RunConfig
from visionfm_core.splits import ModalitySplit, split_train_val


def load_site_data(node_config: Mapping[str, Any], cfg: RunConfig) -> dict[str, ModalitySplit]:
    """The site's data per modality, from node config (deployment) or the scenario (simulation)."""
    if "data-path" in node_config:
        return _deployment_site(node_config, cfg)
    if "partition-id" in node_config:
        if not cfg.scenario:
            raise ConfigError("scenario", "a simulated site (partition-id) needs the run's scenario")
        scenario = load_scenario(cfg.scenario)
        return site_data(scenario, int(node_config["partition-id"]), cfg.val_fraction)
    raise ConfigError("node-config", "set data-path (and modalities) for this site")


def _deployment_site(node_config: Mapping[str, Any], cfg: RunConfig) -> dict[str, ModalitySplit]:
    from visionfm_core.data import sources

    path = str(node_config["data-path"])
    raw_modalities = str(node_config.get("modalities", node_config.get("modality", "")))
    modalities = [canonical_modality(m) for m in raw_modalities.split(",") if m.strip()]
    if not modalities:
        raise ConfigError("modalities", "node config names no modality for this site")
    open_site = getattr(sources, "open_site", None)
    result: dict[str, ModalitySplit] = {}
    for modality in modalities:
        # One data path per site; with several modalities, a sub-folder per modality is expected.
        from pathlib import Path

        root = Path(path)
        folder = root / modality if len(modalities) > 1 and (root / modality).is_dir() else root
        if open_site is not None:
            scan = open_site(str(folder), modality)
        elif folder.suffix == ".npz":
            scan = sources.load_npz_split(folder, "train", modality=modality)
        else:
            labels = folder / "labels.csv"
            scan = sources.scan_image_folder(folder, labels if labels.is_file() else None, modality=modality)
        items = scan.items
        train_idx, val_idx = split_train_val(len(items), cfg.val_fraction, seed=cfg.seed,
                                             groups=[i.patient_key for i in items])
        result[modality] = ModalitySplit(modality, [items[i] for i in train_idx], [items[i] for i in val_idx],
                                         max(1, len(scan.class_names)))
    return result
