"""`visionfm finetune`, `visionfm evaluate` and `visionfm predict`: downstream tasks on one site."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from visionfm_core.cli.common import clean_numbers, console, emit_json, reports_errors, split_names
from visionfm_core.cli.predict_output import MASK_MAX_COLOURS, looks_like_mask, save_masks
from visionfm_core.cli.task_data import TASK_KINDS, TaskOptions, build_task, read_task_data
from visionfm_core.errors import ConfigError
from visionfm_core.progress import console_progress, name_skipped
from visionfm_core.runtime import resolve_device
from visionfm_core.tasks import pipeline
from visionfm_core.tasks.adapters import SegmentationTask, TaskAdapter
from visionfm_core.tasks.persistence import load_task_model
from visionfm_core.tasks.splits import split_samples
from visionfm_core.tasks.trainer import FineTuneConfig

DATA_HELP = (
    "Classification: a CSV (image,label[,patient_id]), a folder of class folders, or a MedMNIST .npz. "
    "Segmentation: CSV image,mask[,fov]. Landmarks: CSV image,<point>_x,<point>_y. Detection: CSV "
    "image,x0,y0,x1,y1,label (one row per box). Regression: CSV image,<target>,... Paths are relative "
    "to the CSV."
)


@reports_errors
def finetune_command(
    train: Annotated[Path, typer.Argument(help=f"training data. {DATA_HELP}")],
    out: Annotated[Path, typer.Option(help="where to write the fine-tuned task model (.safetensors)")],
    task: Annotated[str, typer.Option(help=" | ".join(TASK_KINDS))] = "classification",
    val: Annotated[
        Path | None,
        typer.Option(
            help="validation data (model selection); default: split off "
            "--val-fraction of train, or the .npz 'val' split"
        ),
    ] = None,
    val_fraction: Annotated[float, typer.Option(help="share of train kept for validation when --val is absent")] = 0.2,
    modality: Annotated[str, typer.Option(help="imaging modality (fundus, oct, ...)")] = "fundus",
    encoder: Annotated[
        Path | None,
        typer.Option(help="pretrained encoder: our .safetensors, or a VisionFM / RETFound .pth (imported on the fly)"),
    ] = None,
    arch: Annotated[
        str | None,
        typer.Option(help="architecture when training from scratch (no --encoder) [default: the task's: mini for "
                          "segmentation, micro otherwise]",
                     show_default=False),
    ] = None,
    patch_size: Annotated[
        int | None,
        typer.Option(help="patch size when training from scratch [default: the task's: 16]", show_default=False),
    ] = None,
    trust: Annotated[bool, typer.Option(help="fully unpickle a .pth you trust (can run code from the file)")] = False,
    image_size: Annotated[
        int, typer.Option(help="input size (a square's side); images are letterboxed, any size works")
    ] = 224,
    input_aspect: Annotated[
        str,
        typer.Option(
            help="input width:height. auto: OCT B-scans keep the training images' median aspect (as many "
            "patches as the square), other modalities square | square | W:H | a number"
        ),
    ] = "auto",
    regime: Annotated[str, typer.Option(help="full (fine-tune everything) | frozen (VisionFM probe)")] = "full",
    epochs: Annotated[int, typer.Option(help="at least this many epochs (more when --min-steps needs them)")] = 10,
    min_steps: Annotated[
        int | None,
        typer.Option(help="at least this many optimiser steps, however small the training set [default: the "
                          "task's: 300; segmentation: as many as 9984 tiles take, 4992 steps at its default batch of "
                          "2]", show_default=False),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(help="at most this many inputs a step (fewer on a small set) [default: the task's: 2 for "
                          "segmentation, 16 otherwise]", show_default=False),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(help="peak learning rate of the head [default: the task's: for segmentation 2e-3 at 8 "
                          "tiles a step times the square root of a smaller batch's share, 1e-3 at its default "
                          "2; 1e-3 otherwise]", show_default=False),
    ] = None,
    layer_decay: Annotated[
        float | None,
        typer.Option(help="per-block learning-rate decay of the encoder [default: 0.65; segmentation: 0.65 with "
                          "a pretrained --encoder, 1.0 (none) from scratch]", show_default=False),
    ] = None,
    weight_decay: float = 0.05,
    ema_decay: Annotated[
        float | None,
        typer.Option(help="validate and save a moving average of the weights with this decay, 0 = off [default: "
                          "the task's: 0.99 for segmentation, 0 otherwise]", show_default=False),
    ] = None,
    max_validations: Annotated[
        int | None,
        typer.Option(help="validate (and choose the best weights) at most this many times, evenly spread, the last "
                          "epoch always [default: the task's: 6 for segmentation, 12 otherwise]", show_default=False),
    ] = None,
    patience: Annotated[int | None, typer.Option(help="stop after this many epochs without improvement")] = None,
    select_metric: Annotated[str | None, typer.Option(help="validation metric that picks the epoch")] = None,
    mode: Annotated[
        str, typer.Option(help="classification: binary | multiclass | multilabel | ordinal")
    ] = "multiclass",
    names: Annotated[str | None, typer.Option(help="comma-separated class / point / target names")] = None,
    num_classes: Annotated[int | None, typer.Option(help="classes (segmentation: including background)")] = None,
    mask_mode: Annotated[str, typer.Option(help="segmentation masks: binary | index | colour")] = "binary",
    mask_colours: Annotated[str | None, typer.Option(help="colour-coded masks, e.g. '0,0,0=0;255,255,0=1'")] = None,
    class_weights: Annotated[
        str, typer.Option(help="balanced (inverse class frequency, for a rare class) | none")
    ] = "balanced",
    label_smoothing: float = 0.1,
    pool: Annotated[
        str | None,
        typer.Option(help="classification head (full regime) reads token ([CLS]) | avg (mean patch token) | "
                          "token+avg (the default)"),
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    devices: Annotated[int, typer.Option(help="worker processes, one per device (GPUs: NCCL; CPU: gloo); each "
                                              "trains on its own shard, --batch-size is per device")] = 1,
    seed: int = 0,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    compile: Annotated[str, typer.Option(help="torch.compile the training step: auto (on CUDA, with CUDA "
                                              "graphs) | on | off; a compiler failure falls back to eager")]
    = "auto",
    test_flips: Annotated[
        bool | None,
        typer.Option("--test-flips/--no-test-flips", help="segmentation: the saved model predicts each tile and "
                     "its mirror images, averaged (4x the prediction arithmetic) [default: on]", show_default=False),
    ] = None,
    jpeg_tiles: Annotated[
        float | None,
        typer.Option(help="segmentation: share of training tiles cut as another camera stores its photographs "
                     "(JPEG quality 40-95 applied to the photograph before the contrast standardisation): for "
                     "strongly compressed photographs, at some cost on lossless ones [default: 0]",
                     show_default=False),
    ] = None,
    decoder: Annotated[
        str | None,
        typer.Option(help="segmentation decoder: folded-reduce (no full-resolution convolution; a 1x1 "
                     "projection before the half-resolution fusion) | folded (the default before session 15: "
                     "the fusion's first 3x3 on all 76 channels) | folded-lean (the projection and one 3x3) | "
                     "light (the decoder before 2026-12) | unetr, each at its default width; saved models of "
                     "every decoder load either way [default: folded-reduce]", show_default=False),
    ] = None,
    report: Annotated[Path | None, typer.Option(help="write the JSON summary here instead of stdout")] = None,
) -> None:
    """Fine-tune an encoder plus a task head; the epoch is chosen on validation data, never on test."""
    from visionfm_core.cli.finetune_workers import FinetuneJob, finetune_on_devices
    from visionfm_core.distributed import validate_devices

    validate_devices(devices, device)
    options = TaskOptions(
        task, mode, split_names(names), num_classes, mask_mode, mask_colours, class_weights, label_smoothing, pool
    )
    train_data = read_task_data(options, train, "train", modality)
    val_samples = None
    if val is not None:
        val_samples = read_task_data(options, val, "val", modality, train_data.names).samples
    elif train.suffix == ".npz":
        val_samples = read_task_data(options, train, "val", modality, train_data.names).samples
    train_samples = train_data.samples
    if val_samples is None:
        train_samples, val_samples = split_samples(train_samples, [val_fraction], seed)
    adapter = build_task(options, train_data)
    if decoder is not None:
        adapter = with_decoder(adapter, decoder)
    if batch_size is None:
        batch_size = adapter.default_batch_size
    config = FineTuneConfig(
        regime=regime,  # type: ignore[arg-type]  # checked by FineTuneConfig
        epochs=epochs,
        # The step floor goes with a step's whole batch, over all devices.
        min_steps=adapter.default_steps(batch_size * devices) if min_steps is None else min_steps,
        batch_size=batch_size,
        lr=adapter.default_lr_for(batch_size * devices) if lr is None else lr,
        layer_decay=adapter.default_layer_decay(pretrained=encoder is not None) if layer_decay is None else layer_decay,
        weight_decay=weight_decay,
        ema_decay=adapter.default_ema_decay if ema_decay is None else ema_decay,
        max_validations=adapter.default_max_validations if max_validations is None else max_validations,
        patience=patience,
        select_metric=select_metric,
        seed=seed,
        threads=threads,
        compile=compile,
    )
    source = pipeline.EncoderSource(
        str(encoder) if encoder else None,
        adapter.default_arch if arch is None else arch,
        adapter.default_patch_size if patch_size is None else patch_size,
        trust,
    )
    console.print(f"fine-tuning {task} on {len(train_samples)} images, validating on {len(val_samples)}"
                  + (f", on {devices} devices" if devices > 1 else ""))
    preprocess_options = {
        name: value for name, value in (("test_flips", test_flips), ("jpeg", jpeg_tiles)) if value is not None
    } or None
    if devices > 1:
        job = FinetuneJob(adapter, source, modality, list(train_samples), list(val_samples), config, image_size,
                          device, out, aspect=input_aspect, preprocess_options=preprocess_options)
        result = finetune_on_devices(job, devices)
    else:
        result = pipeline.finetune(
            adapter, source, modality, train_samples, val_samples, config, image_size, resolve_device(device), out,
            preprocess_options=preprocess_options,
            announce=lambda line: console.print(line, markup=False, highlight=False),
            progress=console_progress(console),
            aspect=input_aspect,
        )
    skipped = name_skipped(console, [*train_data.skipped, *result.skipped.items()])
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    emit_json(
        {
            "model": str(out),
            "best_epoch": result.best_epoch,
            "steps": result.steps,
            "batch_size": result.batch_size * devices,  # a step's whole batch, over all devices
            "world_size": devices,
            "warnings": result.warnings,
            "selection_metric": result.selection_metric,
            "validation": result.best_validation,
            "skipped": skipped,
            "history": [
                {
                    "epoch": r.epoch,
                    "train_loss": r.train["loss"],
                    result.selection_metric: r.validation.get(result.selection_metric),
                }
                for r in result.history
            ],
        },
        report,
    )


def with_decoder(adapter: TaskAdapter, decoder: str) -> TaskAdapter:
    """A segmentation task with another decoder at that decoder's default width."""
    if not isinstance(adapter, SegmentationTask):
        raise ConfigError("decoder", f"only segmentation has a decoder to choose, not {adapter.kind}")
    return dataclasses.replace(adapter, decoder=decoder, features=None)


def _task_names(task: Any) -> list[str]:
    for attribute in ("class_names", "point_names", "target_names"):
        if hasattr(task, attribute):
            return list(getattr(task, attribute))
    return []


@reports_errors
def evaluate_command(
    model: Annotated[Path, typer.Argument(help="task model written by `visionfm finetune`")],
    data: Annotated[Path, typer.Argument(help=f"labelled data to score. {DATA_HELP}")],
    split: Annotated[str, typer.Option(help="the .npz split to score")] = "test",
    bootstrap: Annotated[int, typer.Option(help="bootstrap resamples for the AUC confidence interval")] = 1000,
    batch_size: int = 16,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    out: Annotated[Path | None, typer.Option(help="write the metrics JSON here instead of stdout")] = None,
) -> None:
    """Score a fine-tuned model on labelled data (AUC with a bootstrap 95% interval for classification)."""
    loaded = load_task_model(model)
    task = loaded.task
    options = TaskOptions(task.kind, getattr(task, "mode", "multiclass"))
    modality = loaded.encoder_metadata.get("modality", "fundus")
    manifest = read_task_data(options, data, split, modality, _task_names(task))
    unreadable: dict[str, str] = {}
    metrics = pipeline.evaluate(loaded, manifest.samples, resolve_device(device), batch_size, bootstrap, threads,
                                console_progress(console), unreadable)
    name_skipped(console, [*manifest.skipped, *unreadable.items()])
    emit_json({"model": str(model), "task": task.kind, "metrics": metrics}, out)


def _flatten(prediction: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for key, value in prediction.items():
        if key in ("index",):
            continue
        if isinstance(value, dict):
            for name, inner in value.items():
                if isinstance(inner, list) and len(inner) == 2:
                    row[f"{name}_x"], row[f"{name}_y"] = inner
                else:
                    row[f"{key}_{name}"] = inner
        elif isinstance(value, list):
            row[key] = json.dumps(value)
        else:
            row[key] = value
    return row


@reports_errors
def predict_command(
    model: Annotated[Path, typer.Argument(help="task model written by `visionfm finetune`")],
    inputs: Annotated[Path, typer.Argument(help="an image, a folder (nested; images and DICOM) or a DICOM file")],
    out: Annotated[Path, typer.Option(help="predictions file: .csv or .json")],
    masks: Annotated[
        Path | None,
        typer.Option(help="segmentation: folder for the <image>_mask.png files (default: beside --out)"),
    ] = None,
    batch_size: int = 16,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
) -> None:
    """Predict on unlabelled images. Segmentation masks are written at each image's own size as
    `<image>_mask.png` (0/255 for one class, a palette image of class ids for several)."""
    from visionfm_core.data.site import open_site

    if out.suffix not in (".csv", ".json"):
        raise ConfigError("out", f"predictions go to a .csv or .json file, got {out.name}")
    loaded = load_task_model(model)
    modality = loaded.encoder_metadata.get("modality")
    scan = open_site(inputs, modality)
    if not scan.items:
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in scan.skipped[:3])
        raise ConfigError("inputs", f"no usable image in {inputs}" + (f" ({reasons})" if reasons else ""))
    _warn_about_masks(sorted({item.source for item in scan.items}))
    predictions = pipeline.predict(loaded, scan.items, resolve_device(device), batch_size, threads,
                                   console_progress(console))
    predictions += [{"source": s.path, "error": s.reason} for s in scan.skipped]
    name_skipped(console, [(p["source"], p["error"]) for p in predictions if "error" in p])
    if loaded.task.kind == "segmentation":
        save_masks(predictions, masks or out.parent, int(getattr(loaded.task, "num_classes", 2)))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".json":
        out.write_text(
            json.dumps(clean_numbers([{k: v for k, v in p.items() if k != "index"} for p in predictions]), indent=2)
            + "\n",
            encoding="utf-8",
        )
    else:
        rows = [_flatten(p) for p in predictions]
        columns = list(dict.fromkeys(key for row in rows for key in row))
        with out.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    failed = sum(1 for p in predictions if "error" in p)
    console.print(f"{len(predictions) - failed} image(s) predicted, {failed} skipped: {out}", markup=False,
                  highlight=False)


def _warn_about_masks(sources: list[str]) -> None:
    """A dataset folder often holds its annotation files next to the photographs: say so, by name."""
    suspects = [source for source in sources if looks_like_mask(source)]
    if not suspects:
        return
    console.print(f"[yellow]warning:[/] {len(suspects)} of {len(sources)} input(s) look like masks or annotations "
                  f"(at most {MASK_MAX_COLOURS} distinct values), not photographs; predicting on them anyway:")
    for source in suspects:
        console.print(f"  {source}", markup=False, highlight=False)
