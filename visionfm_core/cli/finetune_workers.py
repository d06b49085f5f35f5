"""`visionfm finetune --devices N`: one fine-tuning run as N data-parallel worker processes.

The command starts the workers itself (`distributed.launch`: gloo on CPU, NCCL with one GPU per worker);
each gets the whole labelled set and trains on its shard (`DistributedFineTuner`). The main worker
(rank 0) speaks for the run: it announces the encoder, shows progress, validates, saves the one task
model and returns the result; the others stay quiet. Files a worker could not read are collected from
all of them, so the run names every skipped file once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch.distributed as dist

from visionfm_core.cli.common import console
from visionfm_core.distributed import DistContext, launch, worker_device
from visionfm_core.progress import NO_PROGRESS, console_progress
from visionfm_core.tasks import pipeline
from visionfm_core.tasks.adapters import TaskAdapter
from visionfm_core.tasks.samples import TaskSample
from visionfm_core.tasks.trainer import FineTuneConfig, FitResult


@dataclass(frozen=True)
class FinetuneJob:
    """Everything one fine-tuning run needs (picklable: every worker gets a copy)."""

    task: TaskAdapter
    source: pipeline.EncoderSource
    modality: str
    train: list[TaskSample]
    val: list[TaskSample]
    config: FineTuneConfig
    image_size: int
    device: str
    out: Path
    aspect: str | float = "auto"
    preprocess_options: dict[str, Any] | None = None  # the CLI's overrides of the task's preprocessing


def finetune_on_devices(job: FinetuneJob, devices: int) -> FitResult:
    """Run `job` on `devices` workers; the result (without the model, which rank 0 has saved to
    `job.out`) comes from rank 0. Raises WorkerFailedError when a worker stops."""
    result: FitResult = launch(run_worker, (job,), devices, job.device)
    return result


def _say(line: str) -> None:
    console.print(line, markup=False, highlight=False)


def run_worker(ctx: DistContext, job: FinetuneJob) -> FitResult:
    """One worker's part of the run (called in each worker process by `launch`)."""
    if ctx.is_main:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    else:  # the main worker reports the run's warnings; the others decide the same things
        logging.getLogger("visionfm_core").setLevel(logging.ERROR)
    result = pipeline.finetune(
        job.task, job.source, job.modality, job.train, job.val, job.config, job.image_size,
        worker_device(job.device, ctx.rank), job.out,
        announce=_say if ctx.is_main else None,
        progress=console_progress(console) if ctx.is_main else NO_PROGRESS,
        dist=ctx,
        aspect=job.aspect,
        preprocess_options=job.preprocess_options,
    )
    skipped: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(skipped, result.skipped)
    merged = {path: reason for part in skipped for path, reason in part.items()}
    return replace(result, model=None, skipped=merged)  # type: ignore[arg-type]  # the model stays in the worker
