"""Read the data a task command points at, and build the task adapter from options and data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from visionfm_core.errors import ConfigError
from visionfm_core.models.heads import POOLS
from visionfm_core.tasks.adapters import (
    ClassificationTask,
    DetectionTask,
    LandmarkTask,
    RegressionTask,
    SegmentationTask,
    TaskAdapter,
)
from visionfm_core.tasks.adapters.classification import MODES
from visionfm_core.tasks.manifests import (
    Manifest,
    classification_source,
    read_detection_csv,
    read_landmark_csv,
    read_regression_csv,
    read_segmentation_csv,
)
from visionfm_core.tasks.samples import MaskEncoding

TASK_KINDS = ("classification", "segmentation", "landmarks", "detection", "regression")


@dataclass
class TaskOptions:
    """Command-line task settings; unset ones are read from the data."""

    kind: str = "classification"
    mode: str = "multiclass"
    names: list[str] = field(default_factory=list)
    num_classes: int | None = None
    mask_mode: str = "binary"
    mask_colours: str | None = None
    class_weighting: str = "none"
    label_smoothing: float = 0.1
    pool: str | None = None  # classification head pooling (None: the task's default)

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ConfigError("task", f"unknown task {self.kind!r}; use one of {', '.join(TASK_KINDS)}")
        if self.kind == "classification" and self.mode not in MODES:
            raise ConfigError("mode", f"unknown classification mode {self.mode!r}; use {', '.join(MODES)}")
        if self.pool is not None and self.pool not in POOLS:
            raise ConfigError("pool", f"unknown pooling {self.pool!r}; use {', '.join(POOLS)}")


def read_task_data(
    options: TaskOptions, path: Path, split: str | None, modality: str, names: list[str] | None = None
) -> Manifest:
    """Samples for ``options.kind`` from ``path`` (CSV manifest; classification also folders and .npz)."""
    names = names or options.names or None
    kind = options.kind
    if kind == "classification":
        return classification_source(path, split, names, modality, multilabel=options.mode == "multilabel")
    if path.suffix != ".csv":
        raise ConfigError("data", f"{kind} data is a CSV manifest (see `visionfm finetune --help`), got {path.name}")
    if kind == "segmentation":
        return read_segmentation_csv(path, modality)
    if kind == "landmarks":
        return read_landmark_csv(path, names, modality)
    if kind == "detection":
        return read_detection_csv(path, names, modality)
    return read_regression_csv(path, names or [], modality)


def build_task(options: TaskOptions, manifest: Manifest) -> TaskAdapter:
    """The adapter for ``options.kind``, sized from the options or the training data's names."""
    names = tuple(options.names or manifest.names)
    kind = options.kind
    if kind == "classification":
        count = options.num_classes or len(names)
        task = ClassificationTask(
            count,
            options.mode,  # type: ignore[arg-type]  # checked in TaskOptions
            names if len(names) == count else (),
            label_smoothing=options.label_smoothing,
            class_weighting=options.class_weighting,  # type: ignore[arg-type]  # checked by the task
        )
        if options.pool:
            task.pool = options.pool
        return task
    if kind == "segmentation":
        if options.mask_colours:
            encoding = MaskEncoding.parse_colours(options.mask_colours)
        else:
            encoding = MaskEncoding(options.mask_mode)  # type: ignore[arg-type]
        count = options.num_classes or (len(names) if names else 2)
        return SegmentationTask(count, names if len(names) == count else (), encoding)
    if kind == "landmarks":
        return LandmarkTask(len(names), names)
    if kind == "detection":
        return DetectionTask(len(names), names)
    return RegressionTask(len(names), names)
