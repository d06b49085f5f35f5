"""Task adapters by kind: each gives its head, targets, loss, metrics and predictions."""

from __future__ import annotations

from typing import Any

from visionfm_core.errors import ConfigError
from visionfm_core.tasks.adapters.base import Meter, Regime, TaskAdapter
from visionfm_core.tasks.adapters.classification import ClassificationTask
from visionfm_core.tasks.adapters.detection import DetectionTask
from visionfm_core.tasks.adapters.landmarks import LandmarkTask
from visionfm_core.tasks.adapters.regression import RegressionTask
from visionfm_core.tasks.adapters.segmentation import SegmentationTask

TASKS: dict[str, type[TaskAdapter]] = {
    t.kind: t for t in (ClassificationTask, SegmentationTask, LandmarkTask, DetectionTask, RegressionTask)
}


def task_from_config(kind: str, config: dict[str, Any]) -> TaskAdapter:
    """Rebuild an adapter from the ``kind`` and ``config`` stored with a task model."""
    if kind not in TASKS:
        raise ConfigError("task", f"unknown task {kind!r}; known: {', '.join(TASKS)}")
    try:
        return TASKS[kind].from_config(config)
    except TypeError as exc:
        raise ConfigError("task", f"config does not fit a {kind!r} task: {exc}") from exc


__all__ = [
    "TASKS",
    "ClassificationTask",
    "DetectionTask",
    "LandmarkTask",
    "Meter",
    "Regime",
    "RegressionTask",
    "SegmentationTask",
    "TaskAdapter",
    "task_from_config",
]
