"""Does the data pipeline keep up with the SSL step? Images/s of decode + multi-crop augmentation in
DataLoader workers, measured on its own, against images/s of the training step, in the same run.

Data: the bundled HRF fundus photographs (1752x1168 JPEG: the decode-heavy case), OCT2017 B-scans
(512x496 JPEG) and RetinaMNIST (28 px, from .npz: the augmentation-only case). The loader is the one a
site trains with (`ImageDataset` + `multicrop_transform` + `collate_multicrop` in `make_loader`), run
for a fixed number of images with 0 (in-process), 1 and 2 worker processes. The step is
`SSLTrainer.train_step` on random crops of the same shapes (what bench_ssl_step.py times).

Printed per (config, dataset, workers): loader images/s and loader / step. A ratio >= 1 means the
loader alone keeps up with the step. On a 2-core machine workers and the step share the cores, so
the ratio per core (loader images/s per worker over step images/s per thread) is also shown.

Usage: python bench/bench_data_pipeline.py [--configs vit_ti8_64 vit_s16_224] [--images 96] [--workers 0 1 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import add_smoke_flag, print_cpu
from bench_ssl_step import CONFIGS, BenchConfig, random_crops, ssl_config

import simulations
from visionfm_core.data.datasets import ImageDataset
from visionfm_core.data.items import ImageItem
from visionfm_core.data.loading import make_loader
from visionfm_core.data.sources import load_npz_split, scan_image_folder
from visionfm_core.data.transforms import BatchedMultiCrop, collate_multicrop, multicrop_transform
from visionfm_core.modalities import get_modality
from visionfm_core.models.encoders import EncoderSpec
from visionfm_core.ssl.trainer import SSLTrainer

DATA = Path(simulations.__file__).resolve().parent / "data"


def datasets() -> dict[str, tuple[str, list[ImageItem]]]:
    """name -> (modality, items) of the bundled sample data."""
    return {
        "hrf 1752x1168 jpeg": ("fundus", list(scan_image_folder(DATA / "hrf" / "images", modality="fundus").items)),
        "oct2017 512x496 jpeg": ("oct", list(scan_image_folder(DATA / "oct2017_val" / "val", modality="oct").items)),
        "retinamnist 28px npz": ("fundus", list(load_npz_split(DATA / "retinamnist" / "retinamnist.npz", "train",
                                                               modality="fundus").items)),
    }


def loader_rate(items: Sequence[ImageItem], modality: str, bench: BenchConfig, images: int, workers: int,
                batched: bool = True) -> float:
    """Images/s through the site's multi-crop loader (worker start-up excluded: workers persist).
    batched=False: every augmentation per image (torchvision's usual way), for comparison."""
    cfg = ssl_config(bench, amp=True)
    multicrop = multicrop_transform(get_modality(modality), cfg, bench.global_size, bench.patch)
    repeated = [items[i % len(items)] for i in range(max(images, bench.batch) + bench.batch)]
    dataset = ImageDataset(repeated, multicrop.crop if batched else multicrop)
    loader = make_loader(dataset, bench.batch, num_workers=workers, drop_last=True,
                         collate_fn=BatchedMultiCrop(multicrop) if batched else collate_multicrop)
    batches = iter(loader)
    next(batches)  # workers started and warm
    started, seen = time.perf_counter(), 0
    while seen < images:
        views, _ = next(batches)
        seen += int(views[0].shape[0])
    return seen / (time.perf_counter() - started)


def step_rate(bench: BenchConfig, steps: int) -> float:
    """Median images/s of our SSL step (bf16 autocast where the CPU has it) on random crops."""
    spec = EncoderSpec(bench.arch, bench.global_size, bench.patch)
    trainer = SSLTrainer(spec, get_modality("fundus"), ssl_config(bench, amp=True), steps + 1)
    crops = random_crops(bench)
    trainer.train_step(crops, 0)
    times = []
    for step in range(1, steps + 1):
        started = time.perf_counter()
        trainer.train_step(crops, step)
        times.append(time.perf_counter() - started)
    return bench.batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["vit_ti8_64", "vit_s16_224"], choices=sorted(CONFIGS))
    parser.add_argument("--images", type=int, default=96, help="images timed per loader run")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=3)
    add_smoke_flag(parser)
    args = parser.parse_args()
    if args.smoke:
        args.configs, args.images, args.workers, args.steps = ["vit_ti8_64"], 8, [0], 1
    print_cpu()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}")
    sources = datasets()
    if args.smoke:  # the 28 px set only: decoding the large photographs is what takes minutes
        sources = {k: v for k, v in sources.items() if k.startswith("retinamnist")}
    for name in args.configs:
        bench = replace(CONFIGS[name], batch=4) if args.smoke else CONFIGS[name]
        step = step_rate(bench, args.steps)
        print(f"\n{name}: 2x{bench.global_size} + {bench.local_crops}x{bench.local_size} crops, batch {bench.batch}; "
              f"SSL step {step:.1f} images/s (2 threads)")
        for label, (modality, items) in sources.items():
            per_image = loader_rate(items, modality, bench, args.images, 0, batched=False)
            rates = {}
            for workers in args.workers:
                rate = rates[workers] = loader_rate(items, modality, bench, args.images, workers)
                per_core = (rate / max(workers, 1)) / (step / 2)  # one loader core against one step core
                print(f"  {label:<22} workers {workers}: {rate:7.1f} images/s   ratio loader/step {rate / step:5.2f}x"
                      f"   per core {per_core:5.2f}x")
            batched = rates[0] if 0 in rates else loader_rate(items, modality, bench, args.images, 0)
            print(f"  {label:<22} (per-image photometrics, workers 0: {per_image:7.1f} images/s; batched is "
                  f"{batched / per_image:.2f}x)")
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
