"""Simulation scenarios: which sites exist, which modalities each holds, how the bundled data is
partitioned between them, and the run config. Scenarios are TOML files; `quick` and `default` ship
with the package."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from strategies.protocol.datasets import load_dataset
from strategies.protocol.partition import partition_indices
from visionfm_core.data.items import ImageItem
from visionfm_core.errors import ConfigError
from visionfm_core.modalities import canonical_modality
from visionfm_core.run_config import RunConfig
from visionfm_core.splits import ModalitySplit, split_train_val

# The bundled scenarios ship inside the simulations package folder (package data).
SCENARIO_DIR = Path(__file__).resolve().parents[2] / "simulations" / "scenarios"


@dataclass(frozen=True)
class SiteSpec:
    """One simulated hospital."""

    name: str
    modalities: tuple[str, ...]
    # The site's own lifetime DP budget (a simulated site sets it, as a real one does in its node config).
    privacy_epsilon: float | None = None
    privacy_delta: float | None = None


@dataclass(frozen=True)
class SiteResources:
    """What one simulated site reserves on the Ray cluster while it runs (Ray's logical resources)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass(frozen=True)
class Scenario:
    """A whole simulated federation."""

    name: str
    sites: tuple[SiteSpec, ...]
    datasets: dict[str, str]  # modality -> bundled dataset name (labelled: the probes and their test split)
    partition: str = "dirichlet"
    alpha: float = 0.5
    seed: int = 0
    run: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    resources: SiteResources = field(default_factory=SiteResources)
    # modality -> bundled dataset that SSL pretrains on instead of the `datasets` pool (unlabelled images,
    # shared out in equal seeded shares); the `datasets` entry stays the probes' labelled data.
    pretrain_data: dict[str, str] = field(default_factory=dict)

    @property
    def modalities(self) -> list[str]:
        """Every modality some site holds, in the order the datasets table lists them."""
        held = {m for s in self.sites for m in s.modalities}
        return [m for m in self.datasets if m in held]



def _site_budget(site: Mapping[str, Any], default: Mapping[str, Any], index: int) -> tuple[float | None, float | None]:
    """A site's (epsilon, delta): its own keys, else the scenario's `[privacy]` table; validated."""
    values: list[float | None] = []
    for name in ("epsilon", "delta"):
        raw = site.get(f"privacy-{name}", site.get(f"privacy_{name}", default.get(name)))
        if raw is None:
            values.append(None)
            continue
        try:
            values.append(float(raw))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"sites[{index}].privacy-{name}", f"expected a number, got {raw!r}") from exc
    epsilon, delta = values
    if epsilon is not None and not epsilon > 0:
        raise ConfigError(f"sites[{index}].privacy-epsilon", f"must be > 0, got {epsilon}")
    if delta is not None and not 0 < delta < 1:
        raise ConfigError(f"sites[{index}].privacy-delta", f"must lie in (0, 1), got {delta}")
    return epsilon, delta


def scenario_path(name_or_path: str) -> Path:
    """A bundled scenario name ("quick", "default") or a path to a TOML (or resolved JSON) file."""
    path = Path(name_or_path)
    if path.suffix in (".toml", ".json") or path.exists():
        if not path.is_file():
            raise ConfigError("scenario", f"scenario file not found: {path}")
        return path
    bundled = SCENARIO_DIR / f"{name_or_path}.toml"
    if not bundled.is_file():
        known = sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))
        raise ConfigError("scenario", f"unknown scenario {name_or_path!r}; bundled: {', '.join(known)}")
    return bundled


def load_scenario(name_or_path: str, overrides: Mapping[str, Any] | None = None) -> Scenario:
    """Parse and validate a scenario (TOML, or the JSON `scenario_to_dict` writes); `overrides` replace
    top-level keys (sites, partition, alpha, seed)."""
    path = scenario_path(name_or_path)
    text = path.read_text(encoding="utf-8")
    try:
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError("scenario", f"{path}: invalid {path.suffix.lstrip('.').upper() or 'TOML'} ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError("scenario", f"{path}: expected a table of scenario keys")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key == "privacy" and isinstance(value, Mapping) and isinstance(raw.get("privacy"), Mapping):
            value = {**raw["privacy"], **value}  # --privacy-delta alone keeps the scenario's epsilon
        raw[key] = value
    return scenario_from_dict(raw, default_name=path.stem)


def scenario_to_dict(scenario: Scenario) -> dict[str, Any]:
    """The scenario as the mapping `scenario_from_dict` reads: what a run folder keeps, so that every
    site and the server load the very scenario the run resolved (command-line overrides included)."""
    return {
        "name": scenario.name, "description": scenario.description,
        "sites": [{"name": s.name, "modalities": list(s.modalities),
                   **({"privacy-epsilon": s.privacy_epsilon} if s.privacy_epsilon is not None else {}),
                   **({"privacy-delta": s.privacy_delta} if s.privacy_delta is not None else {})}
                  for s in scenario.sites],
        "datasets": dict(scenario.datasets),
        **({"pretrain-data": dict(scenario.pretrain_data)} if scenario.pretrain_data else {}),
        "partition": {"kind": scenario.partition, "alpha": scenario.alpha, "seed": scenario.seed},
        "run": dict(scenario.run),
        "resources": {"num-cpus": scenario.resources.num_cpus, "num-gpus": scenario.resources.num_gpus},
    }


def scenario_from_dict(raw: Mapping[str, Any], default_name: str = "custom") -> Scenario:
    """Validate a scenario mapping (the parsed TOML). A `[privacy]` table (epsilon, delta) gives every site
    that budget; a site's own `privacy-epsilon` / `privacy-delta` wins over it. A `[resources]` table sets
    what each simulated site reserves on the Ray cluster."""
    known = {"name", "description", "sites", "datasets", "pretrain-data", "partition", "run", "privacy", "resources"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown scenario key")
    datasets = {canonical_modality(m): str(d) for m, d in dict(raw.get("datasets", {})).items()}
    if not datasets:
        raise ConfigError("datasets", "the scenario names no dataset per modality")
    pretrain_data = {canonical_modality(m): str(d) for m, d in dict(raw.get("pretrain-data", {})).items()}
    stray = [m for m in pretrain_data if m not in datasets]
    if stray:
        raise ConfigError(f"pretrain-data.{stray[0]}", "no labelled dataset for this modality in [datasets]")
    partition = dict(raw.get("partition", {}))
    sites_raw = raw.get("sites", [])
    if isinstance(sites_raw, int):
        # A bare count: that many sites, each holding every modality of the datasets table.
        sites_raw = [{"name": f"site-{i + 1}", "modalities": list(datasets)} for i in range(sites_raw)]
    sites = []
    for index, site in enumerate(sites_raw):
        modalities = tuple(canonical_modality(m) for m in site.get("modalities", []))
        if not modalities:
            raise ConfigError(f"sites[{index}].modalities", "a site must hold at least one modality")
        missing = [m for m in modalities if m not in datasets]
        if missing:
            raise ConfigError(f"sites[{index}].modalities", f"no dataset for modality {missing[0]!r}")
        epsilon, delta = _site_budget(site, dict(raw.get("privacy", {}) or {}), index)
        sites.append(SiteSpec(str(site.get("name", f"site-{index + 1}")), modalities, epsilon, delta))
    if not sites:
        raise ConfigError("sites", "the scenario has no site")
    return Scenario(
        name=str(raw.get("name", default_name)),
        description=str(raw.get("description", "")),
        sites=tuple(sites),
        datasets=datasets,
        partition=str(partition.get("kind", "dirichlet")),
        alpha=float(partition.get("alpha", 0.5)),
        seed=int(partition.get("seed", 0)),
        run=dict(raw.get("run", {})),
        resources=_site_resources(raw.get("resources", {})),
        pretrain_data=pretrain_data,
    )


def _site_resources(raw: Any) -> SiteResources:
    """The `[resources]` table: `num-cpus` (> 0) and `num-gpus` (>= 0, fractions share a GPU)."""
    if not isinstance(raw, Mapping):
        raise ConfigError("resources", "expected a table with num-cpus and num-gpus")
    unknown = set(raw) - {"num-cpus", "num-gpus"}
    if unknown:
        raise ConfigError(f"resources.{sorted(unknown)[0]}", "unknown key (known: num-cpus, num-gpus)")
    values = {}
    for key, default, lowest in (("num-cpus", 1.0, 0.0), ("num-gpus", 0.0, -1.0)):
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= lowest:
            rule = "> 0" if lowest == 0.0 else ">= 0"
            raise ConfigError(f"resources.{key}", f"must be a number {rule}, got {value!r}")
        values[key] = float(value)
    return SiteResources(values["num-cpus"], values["num-gpus"])


def site_items(scenario: Scenario, modality: str) -> list[list[ImageItem]]:
    """The pool of `modality` divided between the sites that hold it (in site order)."""
    dataset = load_dataset(scenario.datasets[modality], modality)
    holders = [s for s in scenario.sites if modality in s.modalities]
    parts = partition_indices([i.label for i in dataset.pool], len(holders), scenario.partition,
                              scenario.alpha, seed=scenario.seed + _stable_offset(modality))
    return [[dataset.pool[i] for i in part] for part in parts]


def site_pretrain_items(scenario: Scenario, modality: str) -> list[list[ImageItem]] | None:
    """The `pretrain-data` pool of `modality` in equal seeded shares between the sites that hold it
    (None when the scenario pretrains on the labelled `datasets` pool). Patients are dealt out in turn
    after a seeded shuffle within each source folder, so every site gets its part of every camera."""
    name = scenario.pretrain_data.get(modality)
    if name is None:
        return None
    pool = load_dataset(name, modality).pool
    holders = [s for s in scenario.sites if modality in s.modalities]
    patients: dict[str, list[ImageItem]] = {}
    for item in pool:
        patients.setdefault(item.patient_key or item.source, []).append(item)
    order = sorted(patients, key=lambda key: (str(Path(patients[key][0].source).parent), key))
    rng = np.random.default_rng(scenario.seed + _stable_offset(modality))
    folders: dict[str, list[str]] = {}
    for key in order:
        folders.setdefault(str(Path(patients[key][0].source).parent), []).append(key)
    shares: list[list[ImageItem]] = [[] for _ in holders]
    turn = 0
    for keys in folders.values():
        for index in rng.permutation(len(keys)):
            shares[turn % len(holders)].extend(patients[keys[int(index)]])
            turn += 1
    return shares


def _stable_offset(text: str) -> int:
    return sum(ord(c) for c in text)


def site_data(scenario: Scenario, site_index: int, val_fraction: float) -> dict[str, ModalitySplit]:
    """Everything simulated site `site_index` holds, per modality, split into train/validation."""
    if not 0 <= site_index < len(scenario.sites):
        raise ConfigError("partition-id", f"site {site_index} does not exist (scenario has {len(scenario.sites)})")
    site = scenario.sites[site_index]
    result: dict[str, ModalitySplit] = {}
    for modality in site.modalities:
        holders = [i for i, s in enumerate(scenario.sites) if modality in s.modalities]
        items = site_items(scenario, modality)[holders.index(site_index)]
        train_idx, val_idx = split_train_val(len(items), val_fraction, seed=scenario.seed + site_index,
                                             groups=[i.patient_key for i in items])
        dataset = load_dataset(scenario.datasets[modality], modality)
        pretrain = site_pretrain_items(scenario, modality)
        result[modality] = ModalitySplit(modality, [items[i] for i in train_idx], [items[i] for i in val_idx],
                                         dataset.num_classes,
                                         pretrain=pretrain[holders.index(site_index)] if pretrain else [])
    return result


def pooled_data(scenario: Scenario, val_fraction: float) -> dict[str, ModalitySplit]:
    """All sites' data pooled per modality (the centralized baseline), same train/val membership."""
    pooled: dict[str, ModalitySplit] = {}
    for index in range(len(scenario.sites)):
        for modality, split in site_data(scenario, index, val_fraction).items():
            if modality not in pooled:
                pooled[modality] = ModalitySplit(modality, [], [], split.num_classes)
            pooled[modality].train.extend(split.train)
            pooled[modality].val.extend(split.val)
            pooled[modality].pretrain.extend(split.pretrain)
    return pooled


def resolve_config(scenario: Scenario, scenario_ref: str, overrides: Mapping[str, Any]) -> RunConfig:
    """Run config = defaults <- scenario [run] table <- command-line overrides; modalities from the sites."""
    flat: dict[str, Any] = {"modalities": ",".join(scenario.modalities), "scenario": scenario_ref,
                            "server-eval": "scenario"}
    flat.update(scenario.run)
    flat.update({k: v for k, v in overrides.items() if v is not None})
    return RunConfig.from_flat(flat)
