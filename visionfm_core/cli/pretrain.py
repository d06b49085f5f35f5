"""`visionfm pretrain`: self-supervised (DINO / iBOT) pretraining of one encoder on one site's images."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from visionfm_core.cli.common import console, emit_json, reports_errors
from visionfm_core.errors import ConfigError, DataError
from visionfm_core.progress import EpochLine, console_progress, name_skipped

if TYPE_CHECKING:
    from visionfm_core.distributed import DistContext


@dataclass(frozen=True)
class PretrainJob:
    """Everything one pretraining run needs (picklable: each worker of a multi-device run gets a copy)."""

    data: Path
    out: Path
    modality: str
    arch: str
    image_size: int
    patch_size: int
    objective: str
    steps: int
    batch_size: int
    local_crops: int
    lr: float
    split: str
    device: str
    seed: int
    num_workers: int
    keep: str
    compile: str = "auto"


@reports_errors
def pretrain_command(
    data: Annotated[Path, typer.Argument(help="a folder of images/DICOM (nested), one file, or a MedMNIST .npz")],
    out: Annotated[Path, typer.Option(help="encoder checkpoint to write (.safetensors)")],
    modality: Annotated[str, typer.Option(help="imaging modality (fundus, oct, ...)")] = "fundus",
    arch: Annotated[str, typer.Option(help="nano | micro | mini | tiny | small | base | large")] = "micro",
    image_size: Annotated[int, typer.Option(help="global crop size in pixels")] = 64,
    patch_size: int = 16,
    objective: Annotated[str, typer.Option(help="dino | ibot (VisionFM's)")] = "ibot",
    steps: Annotated[int, typer.Option(help="optimisation steps")] = 100,
    batch_size: Annotated[int, typer.Option(help="images per step on each device (the step's batch is "
                                                 "devices x this)")] = 32,
    local_crops: Annotated[int, typer.Option(help="small crops per image besides the two global ones")] = 4,
    lr: float = 5e-4,
    split: Annotated[str, typer.Option(help="the .npz split to pretrain on")] = "train",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    devices: Annotated[int, typer.Option(help="worker processes, one per device (GPUs: NCCL; CPU: gloo); each "
                                              "trains on its own shard of the images")] = 1,
    seed: int = 0,
    num_workers: Annotated[int, typer.Option(help="image-decoding worker processes")] = 0,
    compile: Annotated[str, typer.Option(help="torch.compile the step: auto (on CUDA, with CUDA graphs) | on | "
                                              "off; a compiler failure falls back to eager")] = "auto",
    report: Annotated[Path | None, typer.Option(help="write the JSON summary here instead of stdout")] = None,
    keep: Annotated[
        str,
        typer.Option(
            help="teacher (VisionFM's release; best after long runs) | student (what "
            "a federation shares; moves sooner in short runs)"
        ),
    ] = "teacher",
) -> None:
    """Pretrain an encoder with DINO/iBOT on unlabelled images of this site and save one backbone
    (the teacher by default, as VisionFM releases) with its metadata."""
    from visionfm_core.compile import check_compile_mode
    from visionfm_core.distributed import launch, validate_devices

    if keep not in ("teacher", "student"):
        raise ConfigError("keep", f"use 'teacher' or 'student', got {keep!r}")
    validate_devices(devices, device)
    job = PretrainJob(data, out, modality, arch, image_size, patch_size, objective, steps, batch_size,
                      local_crops, lr, split, device, seed, num_workers, keep, check_compile_mode(compile))
    summary = run_pretrain(None, job) if devices == 1 else launch(run_pretrain, (job,), devices, device)
    emit_json(summary, report)


def run_pretrain(ctx: DistContext | None, job: PretrainJob) -> dict[str, Any]:
    """Pretrain on this process's shard of the images (all of them without `ctx`); the main process saves
    the encoder. Returns the run summary."""
    from visionfm_core.data.datasets import ImageDataset
    from visionfm_core.data.loading import make_loader
    from visionfm_core.data.site import open_site
    from visionfm_core.data.transforms import BatchedMultiCrop, multicrop_transform
    from visionfm_core.distributed import worker_device
    from visionfm_core.modalities import get_modality
    from visionfm_core.models.checkpoint import encoder_metadata, save_encoder
    from visionfm_core.models.encoders import EncoderSpec
    from visionfm_core.runtime import resolve_device, seed_everything
    from visionfm_core.ssl.config import SSLConfig
    from visionfm_core.ssl.trainer import SSLTrainer

    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    main = rank == 0
    seed_everything(job.seed + rank)  # each worker draws its own augmentations
    scan = open_site(job.data, job.modality, split=job.split)
    skipped = name_skipped(console, [(s.path, s.reason) for s in scan.skipped]) if main else len(scan.skipped)
    if len(scan.items) < 2 * world:
        raise DataError(str(job.data), f"found {len(scan.items)} usable image(s); pretraining on {world} "
                                       f"device(s) needs at least {2 * world}")
    items = ctx.shard(scan.items) if ctx is not None else scan.items
    mod = get_modality(job.modality)
    spec = EncoderSpec(arch=job.arch, image_size=job.image_size, patch_size=job.patch_size)
    config = SSLConfig(objective=job.objective, batch_size=job.batch_size, local_crops=job.local_crops, lr=job.lr,
                       min_lr=min(1e-6, job.lr))
    device = worker_device(job.device, rank) if ctx is not None else resolve_device(job.device)
    trainer = SSLTrainer(spec, mod, config, total_steps=job.steps, device=device, seed=job.seed, dist=ctx,
                         compile=job.compile)
    multicrop = multicrop_transform(mod, config, job.image_size, job.patch_size)
    dataset = ImageDataset(items, multicrop.crop)
    # Every worker needs the same batch size (equal shards make the averaged gradient the whole batch's).
    per_device = min(job.batch_size, len(scan.items) // world)
    loader = make_loader(dataset, per_device, job.num_workers, shuffle=True, seed=job.seed + rank,
                         drop_last=True, collate_fn=BatchedMultiCrop(multicrop))
    if main:
        console.print(f"pretraining {job.arch} ({job.objective}) on {len(scan.items)} images for {job.steps} steps"
                      + (f" on {world} devices" if world > 1 else ""))
    chunk = max(1, job.steps // 10)
    done, last = 0, {}
    progress = console_progress(console) if main else None
    if progress is not None:
        progress.start("pretrain", job.steps, f"pretraining {job.arch}")
    while done < job.steps:
        take = min(chunk, job.steps - done)
        started = time.perf_counter()
        last = trainer.train_steps(loader, take, start_step=done)
        done += take
        if progress is not None:
            progress.advance("pretrain", take)
            progress.epoch(EpochLine(done, job.steps, last["loss"], time.perf_counter() - started, unit="step"))
    if progress is not None:
        progress.finish("pretrain", f"pretrained on {len(scan.items)} images")
    summary = {"encoder": str(job.out), "images": len(scan.items), "skipped": skipped, "steps": job.steps,
               "final_loss": last.get("loss"), "world_size": world, "batch_size": per_device * world,
               "images_per_s": last.get("images_per_s", 0.0) * world}
    if main:
        network = trainer.teacher if job.keep == "teacher" else trainer.student
        backbone = {k: v.detach().to("cpu") for k, v in network.backbone.state_dict().items()}
        metadata = encoder_metadata(spec, mod.name, source_format="ssl", objective=job.objective, steps=job.steps,
                                    images=len(scan.items), part=job.keep)
        save_encoder(job.out, backbone, metadata)
    return summary
