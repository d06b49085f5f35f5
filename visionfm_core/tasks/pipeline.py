"""Single-site workflows the CLI and benches call: get an encoder, fine-tune, evaluate, predict."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionfm_core.data.items import ImageItem
from visionfm_core.errors import ConfigError
from visionfm_core.models.checkpoint import encoder_metadata, load_encoder
from visionfm_core.models.encoders import EncoderSpec, create_encoder
from visionfm_core.models.importers import build_encoder, import_encoder, normalisation_name
from visionfm_core.progress import NO_PROGRESS, ProgressReporter
from visionfm_core.tasks.adapters import TaskAdapter
from visionfm_core.tasks.data import Preprocess
from visionfm_core.tasks.persistence import LoadedTaskModel, save_task_model
from visionfm_core.tasks.samples import TaskSample
from visionfm_core.tasks.trainer import FineTuneConfig, FineTuner, FitResult

logger = logging.getLogger(__name__)


@dataclass
class EncoderSource:
    """Where the encoder comes from: a checkpoint (ours, or an upstream .pth) or a fresh architecture."""

    checkpoint: str | None = None
    arch: str = "micro"
    patch_size: int = 16
    trust: bool = False


def prepare_encoder(
    source: EncoderSource, modality: str, image_size: int, announce: Callable[[str], None] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """An encoder at ``image_size`` (position embedding resampled when it was trained at another size)
    and its metadata (``timm_name``, ``timm_kwargs``, ``mean``, ``std``, ...). ``announce`` hears one
    line naming the weights' format and normalisation."""
    if source.checkpoint is None:
        spec = EncoderSpec(arch=source.arch, image_size=image_size, patch_size=source.patch_size)
        return create_encoder(spec), encoder_metadata(spec, modality, source_format="scratch")
    path = Path(source.checkpoint)
    if path.suffix == ".safetensors":
        state, meta = load_encoder(path)
    else:
        imported = import_encoder(path, modality, trust=source.trust)
        state, meta = imported.state, imported.metadata
    trained_at = meta["timm_kwargs"].get("img_size")
    encoder, kwargs = build_encoder(state, meta["timm_name"], meta["timm_kwargs"], image_size, str(path))
    if announce is not None:
        announce(f"encoder {path}: {meta.get('source_format', 'visionfm-fed')} weights, "
                 f"{normalisation_name(meta['mean'])} normalisation")
    if trained_at is not None and trained_at != image_size:
        patch = int(kwargs["patch_size"])
        logger.warning(
            "the encoder was pretrained at %s px and is used at %d px: its position embedding was resampled "
            "from %sx%s to %dx%d patches (pretrain at the size you fine-tune at when you can)",
            trained_at,
            image_size,
            int(trained_at) // patch,
            int(trained_at) // patch,
            image_size // patch,
            image_size // patch,
        )
    return encoder, {**meta, "timm_kwargs": kwargs, "image_size": image_size}


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
) -> FitResult:
    """Fine-tune on ``train``, select on ``val``, and save the task model to ``out`` when given.

    Preprocessing starts from the task's defaults (tiles and augmentation for segmentation), finds
    the field of view of fundus photographs, and ``preprocess_options`` override both."""
    encoder, meta = prepare_encoder(source, modality, image_size, announce)
    options = {**task_preprocess_options(task, modality), **(preprocess_options or {})}
    preprocess = preprocess_for(meta, image_size, **options)
    tuner = FineTuner(task, config, device)
    tuner.progress = progress
    result = tuner.fit(encoder, train, val, preprocess)
    if out is not None:
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
    metrics = tuner.evaluate(loaded.model, loader)
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
    results = tuner.predict(loaded.model, loader)
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
