"""CPU cost of segmentation models as `visionfm finetune --task segmentation` trains them from scratch:
one training step (encoder + decoder, the task's loss, backward, AdamW) on a batch of tiles and one
prediction forward, for each encoder and decoder, as a ratio against the first variant measured in the
same run.

A variant is `arch:patch:decoder:features[:context]` (context: the folded decoder's quarter-resolution
width). Measurement: `--warmup` untimed steps per variant, then `--reps` rounds in which every variant
runs once, the order reversed every other round; each round gives a paired ratio (variant / baseline of
that round), so a burst of load from another process hits both sides. Medians of this process's CPU
time and of the paired ratios are printed. Random weights and inputs.

Usage: python bench/bench_seg_step.py [--tile 224] [--batch 8] [--reps 6] [--threads 1]
       [--variants micro:16:light:8,micro:16:folded:32,mini:16:folded:32,micro:8:light:8]
Smoke (tiny sizes, seconds): --smoke
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from _bench import add_smoke_flag, print_cpu

from visionfm_core.models.encoders import EncoderSpec, create_encoder
from visionfm_core.models.heads import FoldedUNETRHead, TaskModel, encoder_dims
from visionfm_core.tasks.adapters import SegmentationTask
from visionfm_core.tasks.adapters.segmentation import FOLDED_FUSE

DEFAULT_VARIANTS = "micro:16:light:8,micro:16:folded:32,mini:16:folded:32,micro:8:light:8"


def build(variant: str, tile: int) -> TaskModel:
    """The model a variant names, with random weights."""
    arch, patch, decoder, features, *context = variant.split(":")
    task = SegmentationTask(2, features=int(features), decoder=decoder)
    encoder = create_encoder(EncoderSpec(arch=arch, image_size=tile, patch_size=int(patch)))
    head = (
        FoldedUNETRHead(*encoder_dims(encoder)[:2], 2, int(features), int(context[0]), fuse=FOLDED_FUSE[decoder])
        if decoder in FOLDED_FUSE and context
        else task.build_head(*encoder_dims(encoder), "full")
    )
    return TaskModel(encoder, head)


def timers(model: TaskModel, images: torch.Tensor) -> tuple[Callable[[], float], Callable[[], float]]:
    """CPU-second timers of one training step (the segmentation loss) and one prediction forward."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    task = SegmentationTask(2)
    masks = (torch.rand(images.shape[0], *images.shape[-2:]) < 0.1).long()

    def train() -> float:
        start = time.process_time()
        model.train()
        loss = task.loss(model(images), {"mask": masks})  # type: ignore[arg-type]
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        return time.process_time() - start

    def predict() -> float:
        start = time.process_time()
        model.eval()
        with torch.no_grad():
            model(images)
        return time.process_time() - start

    return train, predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tile", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated; the first is the baseline")
    add_smoke_flag(parser)
    args = parser.parse_args()
    variants = args.variants.split(",")
    if args.smoke:
        args.tile, args.batch, args.reps, args.warmup = 32, 2, 2, 1
        variants = ["nano:16:light:8", "nano:16:folded:32", "nano:8:folded:16:24"]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print_cpu()
    print(f"tile {args.tile}, batch {args.batch}, {args.threads} thread(s), {args.reps} rounds, CPU-s of this process",
          flush=True)
    images = torch.randn(args.batch, 3, args.tile, args.tile)
    models = {name: build(name, args.tile) for name in variants}
    runs = {name: timers(model, images) for name, model in models.items()}
    for train, predict in runs.values():
        for _ in range(args.warmup):
            train()
            predict()
    seconds: dict[str, dict[str, list[float]]] = {n: {"train": [], "predict": []} for n in variants}
    for round_ in range(args.reps):
        for name in variants if round_ % 2 == 0 else variants[::-1]:
            train, predict = runs[name]
            seconds[name]["train"].append(train())
            seconds[name]["predict"].append(predict())
    baseline = variants[0]
    for name in variants:
        parts = []
        for kind in ("train", "predict"):
            mine, base = seconds[name][kind], seconds[baseline][kind]
            ratio = statistics.median(m / b for m, b in zip(mine, base, strict=True))
            parts.append(f"{kind} {statistics.median(mine):.3f} CPU-s, ratio {ratio:.2f}")
        encoder = sum(p.numel() for p in models[name].encoder.parameters())
        decoder = sum(p.numel() for p in models[name].head.parameters())
        print(f"{name:22s} {'; '.join(parts)} (against {baseline}); parameters: encoder {encoder}, "
              f"decoder {decoder}", flush=True)


if __name__ == "__main__":
    main()
