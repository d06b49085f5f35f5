"""Single-site workflows the CLI and benches call: get an encoder, fine-tune, evaluate, predict."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from visionfm_core.data.items import ImageItem
from visionfm_core.errors import ConfigError
from visionfm_core.models.checkpoint import encoder_metadata, load_encoder
from visionfm_core.models.encoders import EncoderSpec, create_encoder, encoder_kwargs
from visionfm_core.models.importers import build_encoder, import_encoder, input_hw, normalisation_name
from visionfm_core.progress import NO_PROGRESS, ProgressReporter
from visionfm_core.runtime import seed_everything
from visionfm_core.tasks.adapters import TaskAdapter
from visionfm_core.tasks.aspect import choose_aspect, input_shape
from visionfm_core.tasks.data import Preprocess
from visionfm_core.tasks.data_parallel import DistributedFineTuner
from visionfm_core.tasks.persistence import LoadedTaskModel, save_task_model
from visionfm_core.tasks.samples import TaskSample
from visionfm_core.tasks.trainer import FineTuneConfig, FineTuner, FitResult

if TYPE_CHECKING:
    from visionfm_core.distributed import DistContext

logger = logging.getLogger(__name__)


@dataclass
class EncoderSource:
    """Where the encoder comes from: a checkpoint (ours, or an upstream .pth) or a fresh architecture."""

    checkpoint: str | None = None
    arch: str = "micro"
    patch_size: int = 16
    trust: bool = False


def prepare_encoder(
    source: EncoderSource,
    modality: str,
    image_size: int,
    announce: Callable[[str], None] | None = None,
    aspect: float = 1.0,
) -> tuple[nn.Module, dict[str, Any]]:
    """An encoder for inputs of width / height ``aspect`` with about as many patches as an
    ``image_size`` square (:func:`~visionfm_core.tasks.aspect.input_shape`; position embedding
    resampled when it was trained on another grid) and its metadata (``timm_name``, ``timm_kwargs``,
    ``mean``, ``std``, ``input_shape`` = [height, width], ...). ``announce`` hears one line naming
    the weights' format and normalisation."""
    if source.checkpoint is None:
        spec = EncoderSpec(arch=source.arch, image_size=image_size, patch_size=source.patch_size)
        meta = encoder_metadata(spec, modality, source_format="scratch")
        shape = input_shape(aspect, image_size, source.patch_size)
        if shape[0] == shape[1] == image_size:
            return create_encoder(spec), {**meta, "input_shape": list(shape)}
        kwargs = encoder_kwargs(spec, shape)
        encoder = create_encoder(spec, shape)
        logger.info("input %dx%d px (height x width, aspect %.2f): %dx%d patches", *shape, aspect,
                    shape[0] // source.patch_size, shape[1] // source.patch_size)
        return encoder, {**meta, "timm_kwargs": kwargs, "image_size": shape[1], "input_shape": list(shape)}
    path = Path(source.checkpoint)
    if path.suffix == ".safetensors":
        state, meta = load_encoder(path)
    else:
        imported = import_encoder(path, modality, trust=source.trust)
        state, meta = imported.state, imported.metadata
    trained_at = meta["timm_kwargs"].get("img_size")
    shape = input_shape(aspect, image_size, int(meta["timm_kwargs"]["patch_size"]))
    encoder, kwargs = build_encoder(state, meta["timm_name"], meta["timm_kwargs"], shape, str(path))
    if announce is not None:
        announce(f"encoder {path}: {meta.get('source_format', 'visionfm-fed')} weights, "
                 f"{normalisation_name(meta['mean'])} normalisation")
    if trained_at is not None and input_hw(trained_at) != shape:
        patch = int(kwargs["patch_size"])
        old_h, old_w = input_hw(trained_at)
        logger.warning(
            "the encoder was pretrained at %s px and is used at %s px: its position embedding was resampled "
            "from %dx%d to %dx%d patches (pretrain at the size you fine-tune at when you can)",
            _pixels(old_h, old_w), _pixels(*shape), old_h // patch, old_w // patch, shape[0] // patch,
            shape[1] // patch,
        )
    return encoder, {**meta, "timm_kwargs": kwargs, "image_size": shape[1], "input_shape": list(shape)}


def _pixels(height: int, width: int) -> str:
    """"224" for a square input, "144x352" (height x width) otherwise."""
    return str(width) if height == width else f"{height}x{width}"


def task_preprocess_options(task: TaskAdapter, modality: str) -> dict[str, Any]:
    """What every fine-tuning path (one site, a federated site, the pooled and local-only arms) sets up
    for `task` on `modality`: the task's own defaults (tiles at the working scale and augmentation for
    dense tasks) and, on fundus photographs, the field of view."""
    return {**task.preprocess_defaults(), "fov_crop": modality == "fundus"}


def preprocess_for(encoder_meta: dict[str, Any], image_size: int, **options: Any) -> Preprocess:
    """Normalisation from the encoder's metadata (what its weights were trained with)."""
    mean, std = encoder_meta.get("mean"), encoder_meta.get("std")
    if mean is None or std is None:
        raise ConfigError("encoder.mean", "the encoder metadata has no normalisation (mean/std)")
    return Preprocess(image_size=image_size, mean=tuple(mean), std=tuple(std), **options)  # type: ignore[arg-type]


def finetune(
    task: TaskAdapter,
    source: EncoderSource,
    modality: str,
    train: Sequence[TaskSample],
    val: Sequence[TaskSample],
    config: FineTuneConfig,
    image_size: int,
    device: torch.device | str,
    out: str | Path | None = None,
    preprocess_options: dict[str, Any] | None = None,
    announce: Callable[[str], None] | None = None,
    progress: ProgressReporter = NO_PROGRESS,
    dist: DistContext | None = None,
    aspect: str | float = "auto",
) -> FitResult:
    """Fine-tune on ``train``, select on ``val``, and save the task model to ``out`` when given.

    Preprocessing starts from the task's defaults (tiles and augmentation for segmentation), finds
    the field of view of fundus photographs, and ``preprocess_options`` override both. The input's
    aspect ratio (width / height) is ``aspect``: ``auto`` takes the training images' median for a
    modality that keeps it (OCT B-scans) and a square otherwise; tiles are always square. With ``dist``
    this process is one data-parallel worker of several (``config.batch_size`` per worker); only the
    main worker saves."""
    options = {**task_preprocess_options(task, modality), **(preprocess_options or {})}
    # A fresh encoder's initial weights come from the run's seed too, not from whatever the global
    # generator holds (a second run in the same process would start elsewhere).
    seed_everything(config.seed)
    ratio = 1.0 if options.get("tiles") else choose_aspect(aspect, modality, [sample.item for sample in train])
    encoder, meta = prepare_encoder(source, modality, image_size, announce, aspect=ratio)
    height, width = meta["input_shape"]
    if announce is not None and height != width:
        announce(f"input {height}x{width} px (height x width), the training images' aspect ratio {ratio:.2f}")
    preprocess = preprocess_for(meta, width, image_height=0 if height == width else height, **options)
    tuner = FineTuner(task, config, device) if dist is None else DistributedFineTuner(task, config, device, dist)
    tuner.progress = progress
    result = tuner.fit(encoder, train, val, preprocess)
    if out is not None and (dist is None or dist.is_main):
        save_task_model(
            out,
            result.model,
            task,
            preprocess,
            meta,
            extra={
                "finetune": config.to_dict(),
                "best_epoch": result.best_epoch,
                "steps": result.steps,
                "batch_size": result.batch_size,
                "warnings": result.warnings,
                "selection_metric": result.selection_metric,
                "validation": {k: v for k, v in result.best_validation.items() if v == v},  # drop nan (JSON)
            },
        )
    return result


def evaluate(
    loaded: LoadedTaskModel,
    samples: Sequence[TaskSample],
    device: torch.device | str,
    batch_size: int = 16,
    bootstrap: int = 0,
    threads: int | None = None,
    progress: ProgressReporter = NO_PROGRESS,
    skipped: dict[str, str] | None = None,
) -> dict[str, float]:
    """Metrics of a saved task model on ``samples`` (bootstrap AUC interval for classification);
    files that could not be read are added to ``skipped`` (path -> reason) when given."""
    if bootstrap and hasattr(loaded.task, "bootstrap_resamples"):
        loaded.task.bootstrap_resamples = bootstrap
    tuner = FineTuner(loaded.task, FineTuneConfig(batch_size=batch_size, threads=threads), device)
    tuner.progress = progress
    loaded.model.to(tuner.device)
    loaded.task.check(samples)
    loader = tuner.loader(samples, loaded.preprocess, train=False)
    progress.start("evaluate", len(loader), "evaluating")
    metrics = tuner.evaluate(loaded.model, loader, flips=loaded.preprocess.test_flips)
    progress.finish("evaluate", f"evaluated {len(samples)} images")
    if skipped is not None:
        skipped.update(getattr(loader.dataset, "skipped", {}))
    return metrics


def predict(
    loaded: LoadedTaskModel,
    items: Sequence[ImageItem],
    device: torch.device | str,
    batch_size: int = 16,
    threads: int | None = None,
    progress: ProgressReporter = NO_PROGRESS,
) -> list[dict[str, Any]]:
    """Predictions for unlabelled images, each with ``source`` (the image's name on this site);
    images that could not be read come back as ``{"source", "error"}``."""
    tuner = FineTuner(loaded.task, FineTuneConfig(batch_size=batch_size, threads=threads), device)
    tuner.progress = progress
    loaded.model.to(tuner.device)
    samples = [TaskSample(item) for item in items]
    loader = tuner.loader(samples, loaded.preprocess, train=False, with_targets=False)
    progress.start("predict", len(loader), "predicting")
    results = tuner.predict(loaded.model, loader, flips=loaded.preprocess.test_flips)
    progress.finish("predict", f"predicted {len(results)} images")
    for result in results:
        item = samples[result["index"]].item
        result["source"] = item.source
        if item.frame is not None:
            result["frame"] = item.frame
    skipped = getattr(loader.dataset, "skipped", {})
    for source, reason in skipped.items():
        results.append({"source": source, "error": reason})
    return results
