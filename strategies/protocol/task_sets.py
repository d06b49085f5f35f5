"""Bundled labelled task sets for federated fine-tuning in simulation (`finetune-data`).

Each set names its modality, its task and the task's settings, a pool that is shared out to the
simulated sites holding that modality, and a held-out test part (a quarter of the patients) on which the
server scores every global model. Sites get equal, seeded shares of the pool: these sets have tens of
images, too few for a label-skewed partition.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from strategies.protocol.bundled_data import DATA_DIR
from visionfm_core.errors import ConfigError
from visionfm_core.tasks.adapters import DetectionTask, LandmarkTask, SegmentationTask, TaskAdapter
from visionfm_core.tasks.public_sets import hrf_optic_disc, hrf_samples, idrid_optic_disc
from visionfm_core.tasks.samples import TaskSample
from visionfm_core.tasks.splits import split_samples

TEST_FRACTION = 0.25
SPLIT_SEED = 2013


@dataclass(frozen=True)
class TaskSet:
    """A labelled task of one modality: `pool` is shared out to sites, `test` is never trained on."""

    name: str
    modality: str
    task: str
    settings: dict[str, Any]
    pool: list[TaskSample]
    test: list[TaskSample]


def _task_set(name: str, adapter: TaskAdapter, samples: list[TaskSample]) -> TaskSet:
    pool, test = split_samples(samples, [TEST_FRACTION], seed=SPLIT_SEED)
    return TaskSet(name, "fundus", adapter.kind, adapter.to_config(), pool, test)


def _hrf_vessels() -> TaskSet:
    # 42 HRF photographs with manual vessel masks; the field-of-view masks bound what is scored.
    return _task_set("hrf-vessels", SegmentationTask(2, ("background", "vessel")),
                     hrf_samples(DATA_DIR / "hrf", with_vessels=True))


def _hrf_disc() -> TaskSet:
    # 45 HRF photographs with expert A's optic-disc centre.
    return _task_set("hrf-disc", LandmarkTask(1, ("optic_disc",)), hrf_optic_disc(DATA_DIR / "hrf", "A"))


def _idrid_disc() -> TaskSet:
    # 20 IDRiD photographs with the optic disc's box from its mask.
    return _task_set("idrid-disc", DetectionTask(1, ("optic_disc",)), idrid_optic_disc(DATA_DIR / "idrid_seg"))


TASK_SETS: dict[str, Callable[[], TaskSet]] = {
    "hrf-vessels": _hrf_vessels, "hrf-disc": _hrf_disc, "idrid-disc": _idrid_disc}


@functools.cache
def load_task_set(name: str) -> TaskSet:
    """A bundled task set by name (cached per process)."""
    try:
        factory = TASK_SETS[name]
    except KeyError:
        raise ConfigError("finetune-data", f"unknown task set {name!r}; bundled: {', '.join(TASK_SETS)}") from None
    return factory()


def held_out_sources(modality: str) -> frozenset[str]:
    """Every image that some bundled task set of `modality` holds out as its test split: pretraining in
    simulation leaves them out, so no fine-tuned model is scored on a photograph its encoder saw."""
    return frozenset(sample.source for name in TASK_SETS for sample in load_task_set(name).test
                     if load_task_set(name).modality == modality)


def _label_rank(sample: TaskSample) -> int:
    return -1 if sample.label is None else sample.label


def site_share(task_set: TaskSet, holders: int, position: int) -> list[TaskSample]:
    """The `position`-th of `holders` equal shares of the pool: patients in a seeded order, grouped by
    label, dealt out in turn (so each share also gets its part of every label)."""
    if holders < 1 or not 0 <= position < holders:
        raise ConfigError("partition-id", f"share {position} of {holders} does not exist")
    patients: dict[str, list[TaskSample]] = {}
    for sample in task_set.pool:
        patients.setdefault(sample.item.patient_key or sample.source, []).append(sample)
    order = random.Random(SPLIT_SEED).sample(sorted(patients), len(patients))
    order.sort(key=lambda key: _label_rank(patients[key][0]))  # stable: seeded order within a label
    return [s for i, key in enumerate(order) if i % holders == position for s in patients[key]]
