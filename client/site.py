"""Which images a site trains and validates on, per modality.

In deployment the site is described by its node config (`data-path`, `modalities`); in simulation by
`partition-id` plus the run's scenario. Either way the result is the same: per modality, labelled or
unlabelled items split into train and validation (patient-grouped where patient keys exist). Nothing
here is ever sent: only counts leave the site.

The fine-tuning phase reads the run's task samples with `load_site_tasks`: classification labels come
with the images above; other tasks come from the site's `task-manifest` CSV (deployment) or from a
share of the bundled `finetune-data` set (simulation).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from strategies.protocol.scenario import load_scenario, site_data
from strategies.protocol.task_models import task_adapter, task_samples
from visionfm_core.data.confine import OUTSIDE_REASON, escapes
from visionfm_core.errors import ConfigError, DataError
from visionfm_core.modalities import canonical_modality
from visionfm_core.run_config import RunConfig
from visionfm_core.splits import ModalitySplit, split_train_val
from visionfm_core.tasks.adapters import DetectionTask, LandmarkTask, RegressionTask, TaskAdapter
from visionfm_core.tasks.manifests import (
    Manifest,
    manifest_roots,
    read_detection_csv,
    read_landmark_csv,
    read_regression_csv,
    read_segmentation_csv,
    task_file_problems,
)
from visionfm_core.tasks.samples import TaskSample
from visionfm_core.tasks.splits import TaskSplit, split_samples


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
        root = Path(path)
        folder = root / modality if len(modalities) > 1 and (root / modality).is_dir() else root
        if folder != root and escapes(root, modality):
            raise DataError(str(folder), OUTSIDE_REASON)  # a modality folder linked from elsewhere
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


def load_site_tasks(node_config: Mapping[str, Any], cfg: RunConfig) -> dict[str, TaskSplit]:
    """The site's samples for the run's fine-tuning task, per modality, split into train/validation."""
    if cfg.finetune_task == "classification":
        return {m: TaskSplit(m, task_samples(s.train), task_samples(s.val))
                for m, s in load_site_data(node_config, cfg).items()}
    if "task-manifest" in node_config:
        return _manifest_tasks(str(node_config["task-manifest"]), node_config, cfg)
    if "partition-id" in node_config and cfg.finetune_data:
        return _simulated_tasks(int(node_config["partition-id"]), cfg)
    raise ConfigError("task-manifest", f"set this site's {cfg.finetune_task} manifest (a CSV, or "
                                       "'<modality>=<csv>,...') in its node config")


def _manifest_tasks(spec: str, node_config: Mapping[str, Any], cfg: RunConfig) -> dict[str, TaskSplit]:
    held = str(node_config.get("modalities", node_config.get("modality", ""))).split(",")
    modalities = [canonical_modality(m) for m in held if m.strip()] or cfg.modality_list
    # The run's own task (its point, class or target names select the manifest's columns).
    samples = read_task_manifests(spec, cfg.finetune_task, modalities, lambda modality: task_adapter(cfg, modality),
                                  data_path=str(node_config.get("data-path", "")) or None)
    result: dict[str, TaskSplit] = {}
    for modality, items in samples.items():
        train, val = split_samples(items, [cfg.val_fraction], seed=cfg.seed)
        result[modality] = TaskSplit(modality, train, val)
    return result


def task_manifest_entries(spec: str) -> list[tuple[str, str]]:
    """A `task-manifest` value as (modality, CSV path) pairs: one CSV (modality "" = the site's first) or
    '<modality>=<csv>,...'."""
    entries = []
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        modality, sep, path = entry.partition("=") if "=" in entry else ("", "", entry)
        if (sep and not modality.strip()) or not path.strip():
            raise ConfigError("task-manifest", f"expected '<modality>=<csv>', got {entry!r}")
        entries.append((modality.strip(), path.strip()))
    if len(entries) > 1 and any(not modality for modality, _ in entries):
        raise ConfigError("task-manifest", "with several manifests, name each one's modality: '<modality>=<csv>'")
    return entries


def read_task_manifests(spec: str, kind: str, modalities: Sequence[str],
                        adapter: Callable[[str], TaskAdapter] | None = None,
                        data_path: str | Path | None = None) -> dict[str, list[TaskSample]]:
    """Samples per modality from a `task-manifest` value (see `task_manifest_entries`; an unnamed CSV is
    the first of `modalities`). Without `adapter`, point, class and target names come from the CSV header.
    With `data_path`, every file a manifest names must be an image inside the data folder or the manifest's
    own folder (DataError naming the first offender otherwise): nothing else reaches training."""
    result: dict[str, list[TaskSample]] = {}
    for name, path in task_manifest_entries(spec):
        if not name and not modalities:
            raise ConfigError("task-manifest", "name the modality: '<modality>=<csv>'")
        modality = canonical_modality(name) if name else modalities[0]
        task = adapter(modality) if adapter is not None else None
        samples = _read_manifest(kind, Path(path), modality, task).samples
        if data_path is not None:
            problems = task_file_problems(samples, manifest_roots(path, data_path))
            if problems:
                raise DataError(path, f"{len(problems)} file(s) refused, e.g. {problems[0]}")
        result[modality] = samples
    return result


def _read_manifest(kind: str, path: Path, modality: str, task: TaskAdapter | None) -> Manifest:
    """The manifest's samples; the task's own names pick the columns (points, targets) or the label ids."""
    if kind == "landmarks":
        return read_landmark_csv(path, task.point_names if isinstance(task, LandmarkTask) else None, modality)
    if kind == "detection":
        return read_detection_csv(path, task.class_names if isinstance(task, DetectionTask) else None, modality)
    if kind == "regression":
        return read_regression_csv(path, task.target_names if isinstance(task, RegressionTask) else (), modality)
    if kind == "segmentation":
        return read_segmentation_csv(path, modality)
    raise ConfigError("finetune-task", f"{kind} samples do not come from a task manifest")


def _simulated_tasks(site_index: int, cfg: RunConfig) -> dict[str, TaskSplit]:
    from strategies.protocol.task_sets import load_task_set, site_share

    task_set = load_task_set(cfg.finetune_data)
    scenario = load_scenario(cfg.scenario)
    holders = [i for i, s in enumerate(scenario.sites) if task_set.modality in s.modalities]
    if site_index not in holders:
        return {}
    samples = site_share(task_set, len(holders), holders.index(site_index))
    train, val = split_samples(samples, [cfg.val_fraction], seed=cfg.seed + site_index)
    return {task_set.modality: TaskSplit(task_set.modality, train, val)}
