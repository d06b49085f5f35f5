"""`visionfm pretrain`: self-supervised (DINO / iBOT) pretraining of one encoder on one site's images."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from visionfm_core.cli.common import console, emit_json, reports_errors
from visionfm_core.errors import ConfigError, DataError
from visionfm_core.progress import EpochLine, console_progress, name_skipped


@reports_errors
def pretrain_command(
    data: Annotated[Path, typer.Argument(help="a folder of images/DICOM (nested), one file, or a MedMNIST .npz")],
    out: Annotated[Path, typer.Option(help="encoder checkpoint to write (.safetensors)")],
    modality: Annotated[str, typer.Option(help="imaging modality (fundus, oct, ...)")] = "fundus",
    arch: Annotated[str, typer.Option(help="nano | micro | tiny | small | base | large")] = "micro",
    image_size: Annotated[int, typer.Option(help="global crop size in pixels")] = 64,
    patch_size: int = 16,
    objective: Annotated[str, typer.Option(help="dino | ibot (VisionFM's)")] = "ibot",
    steps: Annotated[int, typer.Option(help="optimisation steps")] = 100,
    batch_size: int = 32,
    local_crops: Annotated[int, typer.Option(help="small crops per image besides the two global ones")] = 4,
    lr: float = 5e-4,
    split: Annotated[str, typer.Option(help="the .npz split to pretrain on")] = "train",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    seed: int = 0,
    num_workers: Annotated[int, typer.Option(help="image-decoding worker processes")] = 0,
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
    from visionfm_core.data.datasets import ImageDataset
    from visionfm_core.data.loading import make_loader
    from visionfm_core.data.site import open_site
    from visionfm_core.data.transforms import BatchedMultiCrop, multicrop_transform
    from visionfm_core.modalities import get_modality
    from visionfm_core.models.checkpoint import encoder_metadata, save_encoder
    from visionfm_core.models.encoders import EncoderSpec
    from visionfm_core.runtime import resolve_device, seed_everything
    from visionfm_core.ssl.config import SSLConfig
    from visionfm_core.ssl.trainer import SSLTrainer

    if keep not in ("teacher", "student"):
        raise ConfigError("keep", f"use 'teacher' or 'student', got {keep!r}")
    seed_everything(seed)
    scan = open_site(data, modality, split=split)
    skipped = name_skipped(console, [(s.path, s.reason) for s in scan.skipped])
    if len(scan.items) < 2:
        raise DataError(str(data), f"found {len(scan.items)} usable image(s); pretraining needs at least 2")
    mod = get_modality(modality)
    spec = EncoderSpec(arch=arch, image_size=image_size, patch_size=patch_size)
    config = SSLConfig(objective=objective, batch_size=batch_size, local_crops=local_crops, lr=lr, min_lr=min(1e-6, lr))
    trainer = SSLTrainer(spec, mod, config, total_steps=steps, device=resolve_device(device), seed=seed)
    multicrop = multicrop_transform(mod, config, image_size, patch_size)
    dataset = ImageDataset(scan.items, multicrop.crop)
    loader = make_loader(
        dataset,
        min(batch_size, len(dataset)),
        num_workers,
        shuffle=True,
        seed=seed,
        drop_last=True,
        collate_fn=BatchedMultiCrop(multicrop),
    )
    console.print(f"pretraining {arch} ({objective}) on {len(scan.items)} images for {steps} steps")
    chunk = max(1, steps // 10)
    done, last = 0, {}
    progress = console_progress(console)
    progress.start("pretrain", steps, f"pretraining {arch}")
    while done < steps:
        take = min(chunk, steps - done)
        started = time.perf_counter()
        last = trainer.train_steps(loader, take, start_step=done)
        done += take
        progress.advance("pretrain", take)
        progress.epoch(EpochLine(done, steps, last["loss"], time.perf_counter() - started, unit="step"))
    progress.finish("pretrain", f"pretrained on {len(scan.items)} images")
    network = trainer.teacher if keep == "teacher" else trainer.student
    backbone = {k: v.detach().to("cpu") for k, v in network.backbone.state_dict().items()}
    metadata = encoder_metadata(
        spec, mod.name, source_format="ssl", objective=objective, steps=steps, images=len(scan.items), part=keep
    )
    save_encoder(out, backbone, metadata)
    emit_json(
        {
            "encoder": str(out),
            "images": len(scan.items),
            "skipped": skipped,
            "steps": steps,
            "final_loss": last.get("loss"),
        },
        report,
    )
