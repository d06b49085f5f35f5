"""Step throughput of a multi-device site: one process training the whole batch against N worker
processes (torch.distributed, gloo on CPU / NCCL on GPUs) each training 1/N of it.

Two modes (`--mode ssl | finetune | both`): the SSL step (DINO, same config) on the same total batch of
random multi-crop views, the workers averaging gradients and centres with all-reduce every step; and the
fine-tuning step (`visionfm finetune --devices N`: classification, full regime, ViT + linear head, DDP)
on the same total batch of random images through the task data pipeline. Printed: images/s of each, and
the ratio N workers / 1 process. On CPU the N workers share the machine's cores (each gets cores / N
threads), so the ratio shows the cost of the all-reduce and of the split, not N times the compute; on a
machine with N GPUs each worker has its own device.

Usage: python bench/bench_multi_device.py [--mode both] [--workers 2] [--batch 32] [--steps 5] [--arch tiny]
                                         [--threads 1] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from typing import Any

import numpy as np
import torch

from visionfm_core.data.items import items_from_arrays
from visionfm_core.distributed import DistContext, launch
from visionfm_core.modalities import get_modality
from visionfm_core.models.encoders import EncoderSpec, create_encoder
from visionfm_core.ssl.config import SSLConfig
from visionfm_core.ssl.trainer import SSLTrainer
from visionfm_core.tasks.adapters import ClassificationTask
from visionfm_core.tasks.data import Preprocess
from visionfm_core.tasks.data_parallel import DistributedFineTuner
from visionfm_core.tasks.samples import TaskSample
from visionfm_core.tasks.trainer import FineTuneConfig, FineTuner


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _views(batch: int, size: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return ([torch.randn(batch, 3, size, size, generator=generator) for _ in range(2)]
            + [torch.randn(batch, 3, size // 2, size // 2, generator=generator) for _ in range(4)])


def run(ctx: DistContext | None, modes: list[str], arch: str, size: int, batch: int, steps: int,
        threads: int) -> dict[str, dict[str, Any]]:
    """Each mode's images/s and losses, one layout (one process without `ctx`, else this worker's part)."""
    if ctx is None:
        torch.set_num_threads(threads)
    runners = {"ssl": run_ssl, "finetune": run_finetune}
    return {mode: runners[mode](ctx, arch, size, batch, steps) for mode in modes}


def run_ssl(ctx: DistContext | None, arch: str, size: int, batch: int, steps: int) -> dict[str, Any]:
    """Images/s of `steps` SSL steps (after one warm-up step) on a total batch of `batch` images."""
    world, rank = (ctx.world_size, ctx.rank) if ctx is not None else (1, 0)
    cfg = SSLConfig(objective="dino", batch_size=batch, local_crops=4, out_dim=4096, head_hidden_dim=2048,
                    head_bottleneck_dim=256)
    trainer = SSLTrainer(EncoderSpec(arch=arch, image_size=size, patch_size=8), get_modality("fundus"), cfg,
                         total_steps=steps + 1, dist=ctx)
    share = batch // world
    views = [v[rank * share:(rank + 1) * share] for v in _views(batch, size, 0)]
    trainer.train_step(views, 0)
    started = time.perf_counter()
    losses = [trainer.train_step(views, step)["loss"] for step in range(1, steps + 1)]
    return {"images_per_s": batch * steps / (time.perf_counter() - started), "losses": losses}


def _images(count: int, size: int) -> list[TaskSample]:
    rng = np.random.default_rng(0)
    labels = np.arange(count) % 2
    images = (rng.integers(0, 90, (count, size, size, 3)) + 120 * labels[:, None, None, None]).astype(np.uint8)
    return [TaskSample(item, label=item.label) for item in items_from_arrays(images, labels, "bench")]


def run_finetune(ctx: DistContext | None, arch: str, size: int, batch: int, steps: int) -> dict[str, Any]:
    """Images/s of `steps` fine-tuning steps (after one warm-up step) on a total batch of `batch` images
    (each worker trains batch / N of them), fp32, augmentation off."""
    world = ctx.world_size if ctx is not None else 1
    config = FineTuneConfig(batch_size=batch // world, mixed_precision=False, min_steps=0)
    task = ClassificationTask(2)
    tuner = FineTuner(task, config) if ctx is None else DistributedFineTuner(task, config, "cpu", ctx)
    torch.manual_seed(0)
    model = tuner.build_model(create_encoder(EncoderSpec(arch=arch, image_size=size, patch_size=8)))
    preprocess = Preprocess(image_size=size, max_zoom=1.0, flip=False, jitter=0.0)
    warm_up = tuner.loader(_images(batch, size), preprocess, train=True, batch_size=batch // world)
    timed = tuner.loader(_images(batch * steps, size), preprocess, train=True, batch_size=batch // world)
    state = tuner.init_state(model, steps + 1)
    tuner.train_epochs(state, warm_up)
    started = time.perf_counter()
    losses = [tuner.train_epochs(state, timed)["loss"]]
    return {"images_per_s": batch * steps / (time.perf_counter() - started), "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("ssl", "finetune", "both"), default="both")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="total images per step")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--arch", default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of the single process (0: all CPUs; the workers get CPUs / N each). "
                             "On a shared container 2 threads can be far slower than 1: measure both")
    parser.add_argument("--smoke", action="store_true", help="nano ViT, 32 px, batch 4, 1 step (both modes)")
    args = parser.parse_args()
    if args.smoke:
        args.arch, args.size, args.batch, args.steps = "nano", 32, 4, 1
        args.threads = args.threads or 1  # one thread is many times faster than two on a busy shared CPU
    threads = args.threads or os.cpu_count() or 1
    modes = ["ssl", "finetune"] if args.mode == "both" else [args.mode]
    print(f"CPU: {cpu_model()}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; ViT-{args.arch}/8 at "
          f"{args.size} px, total batch {args.batch}, {args.steps} steps; SSL: 2 global + 4 local crops; "
          f"fine-tuning: classification, full regime")
    single = run(None, modes, args.arch, args.size, args.batch, args.steps, threads)
    multi = launch(run, (modes, args.arch, args.size, args.batch, args.steps, threads), args.workers, "cpu")
    for mode in modes:
        one, many = single[mode], multi[mode]
        print(f"{mode}: 1 process ({threads} thread(s)): {one['images_per_s']:.2f} images/s, losses "
              f"{[round(v, 4) for v in one['losses']]}")
        print(f"{mode}: {args.workers} processes: {many['images_per_s']:.2f} images/s, losses "
              f"{[round(v, 4) for v in many['losses']]}")
        print(f"{mode}: ratio {args.workers} processes / 1 process: "
              f"{many['images_per_s'] / one['images_per_s']:.2f}x images/s (gloo, CPU threads split between the "
              f"workers)")


if __name__ == "__main__":
    main()
