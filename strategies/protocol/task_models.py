"""The task model every site and the server build alike: the run's task adapter, its fine-tuning
settings, the head's keys and seeded initial weights, and which scores a round reports. Both sides
must agree on these (a site and the server building different heads could not average them)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from visionfm_core.data.batches import cycle_batches
from visionfm_core.data.items import ImageItem
from visionfm_core.errors import CheckpointError, ConfigError
from visionfm_core.models.checkpoint import read_metadata
from visionfm_core.models.heads import TaskModel
from visionfm_core.models.importers import resample_position_embedding
from visionfm_core.pretraining import BACKBONE_PREFIX, encoder_from_arrays, new_encoder
from visionfm_core.run_config import RunConfig
from visionfm_core.runtime import seed_everything
from visionfm_core.tasks.adapters import ClassificationTask, TaskAdapter, task_from_config
from visionfm_core.tasks.adapters.classification import Mode
from visionfm_core.tasks.aspect import federated_aspect, input_shape
from visionfm_core.tasks.data import Preprocess
from visionfm_core.tasks.pipeline import task_preprocess_options
from visionfm_core.tasks.samples import TaskSample
from visionfm_core.tasks.trainer import FineTuneConfig, FineTuner, TrainState, get_weights, set_weights

CLASSIFIER_PREFIX = "classifier."
# What a task's evaluation reports every round; per-class entries (`dice_vessel`, `mre_fovea`) are named
# after the task settings' class or point names, never after the site's data.
HEADLINE = {"classification": ("accuracy", "auc", "kappa", "f1"),
            "segmentation": ("dice", "iou", "dice_per_image", "best_threshold", "dice_at_best_threshold"),
            "landmarks": ("mre",), "detection": ("map50",), "regression": ("mae", "rmse")}
PER_NAME = {"segmentation": "dice_", "landmarks": "mre_", "detection": "ap50_", "regression": "mae_"}


def encoders_pretrained(cfg: RunConfig) -> bool:
    """Whether fine-tuning starts from learnt encoder weights: after the pretraining phase it does; from an
    `init-encoders` folder unless its encoders say they are untrained (`source_format = "scratch"`, as
    `visionfm finetune` and the benches save a seeded random encoder). A folder this process cannot read
    (a site never holds the server's) counts as pretrained: the server, which reads it, resolves first."""
    if not cfg.init_encoders:
        return True
    formats = []
    for modality in cfg.modality_list:
        try:
            formats.append(read_metadata(Path(cfg.init_encoders) / f"{modality}.safetensors").get("source_format"))
        except (CheckpointError, OSError):
            return True
    return not formats or any(f != "scratch" for f in formats)


def resolve_recipe(cfg: RunConfig, task: TaskAdapter) -> RunConfig:
    """`cfg` with the fine-tuning recipe's "task default" values (`finetune-lr` 0, `finetune-layer-decay` 0,
    `finetune-min-steps` -1) replaced by `task`'s own, the ones `visionfm finetune` uses: its learning rate,
    its layer decay for a pretrained or scratch encoder, and its least number of optimiser steps. Values
    the run sets win. The server resolves once and sends the values (every site and arm then agrees)."""
    changes: dict[str, Any] = {}
    if cfg.finetune_lr == 0:
        changes["finetune_lr"] = task.default_lr
    if cfg.finetune_layer_decay == 0:
        changes["finetune_layer_decay"] = task.default_layer_decay(encoders_pretrained(cfg))
    if cfg.finetune_min_steps < 0:
        changes["finetune_min_steps"] = task.default_min_steps
    return cfg.replace(**changes) if changes else cfg


def finetune_config(cfg: RunConfig, task: TaskAdapter | None = None) -> FineTuneConfig:
    """The fine-tuning hyperparameters of the run (one epoch of warm-up spread over the first round);
    with `task`, its defaults fill what the run leaves to the task (`resolve_recipe`)."""
    if task is not None:
        cfg = resolve_recipe(cfg, task)
    if cfg.finetune_lr == 0 or cfg.finetune_layer_decay == 0:
        raise ConfigError("finetune-lr", "the task's default learning rate and layer decay are not resolved yet")
    return FineTuneConfig(regime="frozen" if cfg.finetune_encoder == "frozen" else "full",
                          epochs=cfg.finetune_epochs, batch_size=cfg.finetune_batch_size, lr=cfg.finetune_lr,
                          layer_decay=cfg.finetune_layer_decay, min_steps=max(0, cfg.finetune_min_steps),
                          warmup_epochs=min(1.0, float(cfg.finetune_epochs)), seed=cfg.seed,
                          num_workers=cfg.num_workers, compile=cfg.compile)


def round_steps(cfg: RunConfig, steps_per_epoch: int) -> int:
    """Optimiser steps of one fine-tuning round at a site (and of each round of a baseline arm):
    `finetune-epochs` passes over its train split, or more, so that the rounds together train at least
    `finetune-min-steps` (resolved; see `resolve_recipe`), as `visionfm finetune` trains at least
    `--min-steps` on a small set. Every party counts the same way, whatever the size of its data."""
    floor = math.ceil(max(0, cfg.finetune_min_steps) / max(1, cfg.finetune_rounds))
    return max(cfg.finetune_epochs * steps_per_epoch, floor)


def train_steps(tuner: FineTuner, state: TrainState, loader: DataLoader[Any], steps: int) -> dict[str, float]:
    """`steps` optimiser steps of `tuner` on `loader` (whole passes, the last one cut short); the trainer's
    statistics (mean loss, steps taken, last learning rate)."""
    if steps % max(1, len(loader)) == 0:
        return tuner.train_epochs(state, loader, steps // max(1, len(loader)))
    # The trainer iterates what it is given once; the first `steps` batches of endless passes are such an
    # iterable (the loader is not empty here: its length divides any step count otherwise).
    return tuner.train_epochs(state, cast(DataLoader[Any], islice(cycle_batches(loader), steps)), 1)


def class_count(cfg: RunConfig, modality: str) -> int:
    """Classes of `modality`'s classification task (`finetune-classes`, resolved by the server)."""
    configured = cfg.finetune_class_counts().get(modality)
    if configured is None:
        raise ConfigError("finetune-classes", f"set the number of {modality} classes, e.g. '{modality}=5'")
    return configured


def task_adapter(cfg: RunConfig, modality: str) -> TaskAdapter:
    """The run's task for `modality`: the same adapter, hence the same head, on every site and the server.
    Nothing is fitted to a site's data here (a regression's target scaling comes from the settings),
    since sites fitting their own would each train a differently scaled head."""
    if cfg.finetune_task == "classification":
        return ClassificationTask(class_count(cfg, modality), mode=cast(Mode, cfg.finetune_mode))
    settings = cfg.finetune_task_settings()
    if not settings:
        raise ConfigError("finetune-task-config", f"a {cfg.finetune_task} task needs its settings, e.g. "
                                                  '{"num_classes": 2} (or a bundled finetune-data set)')
    try:
        return task_from_config(cfg.finetune_task, settings)
    except ConfigError as exc:
        raise ConfigError("finetune-task-config", str(exc)) from exc


def new_tuner(cfg: RunConfig, modality: str, device: torch.device) -> FineTuner:
    """A fine-tuner for the run's task; its batch is at most what the task trains well with (a dense
    task's batch of tiles), as `visionfm finetune` caps it."""
    task = task_adapter(cfg, modality)
    config = finetune_config(cfg, task)
    if task.max_batch_size is not None:
        config.batch_size = min(config.batch_size, task.max_batch_size)
    return FineTuner(task, config, device)


def task_preprocess(cfg: RunConfig, task: TaskAdapter, modality: str) -> Preprocess:
    """The preprocessing of `visionfm finetune` for `task`: on fundus photographs the field of view, for
    dense tasks tiles at the working scale in training and whole photographs scored at their own
    resolution (sliding windows) in evaluation; `finetune-preprocess` overrides. Every fine-tuning path
    of a federation (sites, server, pooled and local-only arms) uses it."""
    options = _preprocess_options(cfg, task, modality)
    height, width = finetune_input_shape(cfg, task, modality)
    try:
        return Preprocess.for_modality(modality, width, image_height=0 if height == width else height, **options)
    except (TypeError, ConfigError) as exc:
        raise ConfigError("finetune-preprocess", f"not a valid preprocessing setting: {exc}") from exc


def _preprocess_options(cfg: RunConfig, task: TaskAdapter, modality: str) -> dict[str, Any]:
    return {**task_preprocess_options(task, modality), **cfg.finetune_preprocess_options()}


def finetune_input_shape(cfg: RunConfig, task: TaskAdapter, modality: str) -> tuple[int, int]:
    """(height, width) of the fine-tuning input of `modality`, the same at every site and the server:
    `finetune-input-aspect` (auto: the modality's fixed federated aspect, never measured on a site's
    images) with as many patches as the `image-size` square; square tiles for tiled dense tasks."""
    if _preprocess_options(cfg, task, modality).get("tiles"):
        return cfg.image_size, cfg.image_size
    try:
        ratio = federated_aspect(cfg.finetune_aspect_setting(modality), modality)
        return input_shape(ratio, cfg.image_size, cfg.patch_size)
    except ConfigError as exc:
        raise ConfigError("finetune-input-aspect", str(exc)) from exc


def finetune_encoder_arrays(arrays: Mapping[str, np.ndarray], cfg: RunConfig) -> dict[str, np.ndarray]:
    """The encoders of `arrays` (`<modality>/backbone.*`) with each position embedding resampled once
    (bicubic) from the pretraining grid to the fine-tuning input's patch grid, where they differ; the
    fine-tuning phase exchanges these arrays, so no site resamples (and all train the same weights)."""
    out = dict(arrays)
    for modality in cfg.modality_list:
        key = f"{modality}/{BACKBONE_PREFIX}pos_embed"
        if key not in out:
            continue
        shape = finetune_input_shape(cfg, task_adapter(cfg, modality), modality)
        square = (cfg.image_size, cfg.image_size)
        if shape != square:
            resampled = resample_position_embedding({"pos_embed": torch.as_tensor(np.asarray(out[key]))}, shape,
                                                    cfg.patch_size, square)
            out[key] = resampled["pos_embed"].numpy().astype(np.float32)
    return out


def shareable(weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The floating-point part of a state dict as float32 (BatchNorm's step counter is not averaged)."""
    return {k: v.detach().to("cpu", torch.float32) for k, v in weights.items() if v.is_floating_point()}


def load_head(model: TaskModel, weights: Mapping[str, Tensor]) -> None:
    """Load a (shareable) head; keys it lacks, such as BatchNorm's counter, keep the model's own values."""
    merged = get_weights(model, "head")
    for key, value in weights.items():
        merged[key] = value.to(merged[key].dtype) if key in merged else value
    set_weights(model, merged, "head")


def build_task_model(tuner: FineTuner, cfg: RunConfig, shared: Mapping[str, Tensor],
                     head: Mapping[str, Tensor] | None, modality: str) -> TaskModel:
    """Encoder from the `backbone.*` arrays (on the fine-tuning input's patch grid, see
    `finetune_encoder_arrays`) plus the given head (a fresh, seeded one when None)."""
    seed_everything(cfg.seed)
    shape = finetune_input_shape(cfg, tuner.task, modality)
    pos = shared.get(f"{BACKBONE_PREFIX}pos_embed")
    patches = (shape[0] // cfg.patch_size) * (shape[1] // cfg.patch_size)
    if pos is not None and pos.shape[1] - 1 != patches:  # the sender resampled for another input shape
        raise ConfigError("finetune-input-aspect", f"the global {modality} encoder holds {pos.shape[1] - 1} patch "
                                                   f"positions; this run's {shape[0]}x{shape[1]} px input needs "
                                                   f"{patches}: every party must fine-tune at the same input shape")
    model = tuner.build_model(encoder_from_arrays(shared, cfg, shape))
    if head:
        load_head(model, head)
    return model


def initial_head(cfg: RunConfig, modality: str) -> dict[str, Tensor]:
    """The round-1 shared head: the same seeded head every site would build."""
    tuner = new_tuner(cfg, modality, torch.device("cpu"))
    seed_everything(cfg.seed)
    encoder = new_encoder(cfg, finetune_input_shape(cfg, tuner.task, modality))
    return shareable(get_weights(tuner.build_model(encoder), "head"))


def reported_scores(task: str, scores: Mapping[str, float]) -> dict[str, float]:
    """The evaluation numbers a round reports: the task's headline metrics, its per-name ones, the sample
    count and the loss ("task-loss", so reports never mix it up with the SSL loss of pretraining rows)."""
    per_name = PER_NAME.get(task)
    kept = {k: float(v) for k, v in scores.items()
            if k in HEADLINE[task] or k == "count" or (per_name is not None and k.startswith(per_name))}
    if "loss" in scores:
        kept["task-loss"] = float(scores["loss"])
    return kept


def task_samples(items: Sequence[ImageItem]) -> list[TaskSample]:
    """Labelled items as classification samples (unlabelled ones cannot be fine-tuned on)."""
    return [TaskSample(item, label=item.label) for item in items if item.label is not None]
