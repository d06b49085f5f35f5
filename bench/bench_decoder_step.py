"""Segmentation decoders' cost on the CPU: one training step (micro ViT + decoder, forward, backward,
AdamW) on a batch of tiles and one prediction forward, for each decoder of `SegmentationTask`, as a
ratio against the light decoder at its default width (features 8) measured in the same run.

Measurement: `--warmup` untimed steps per variant, then `--reps` rounds in which every variant runs
once, the order reversed every other round; each round gives a paired ratio (variant / light of
that round), so a burst of load from another process hits both sides. Medians of the CPU time of
this process and of the paired ratios are printed. Random weights and inputs.

Usage: python bench/bench_decoder_step.py [--tile 224] [--batch 8] [--reps 6] [--threads 1]
       [--variants light:8,folded:32,folded:32:48]   (decoder:features[:context])
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


def build(variant: str, tile: int, arch: str) -> TaskModel:
    decoder, features, *rest = variant.split(":")
    task = SegmentationTask(2, features=int(features), decoder=decoder)
    encoder = create_encoder(EncoderSpec(arch=arch, image_size=tile, patch_size=16))
    head = (
        FoldedUNETRHead(*encoder_dims(encoder)[:2], 2, int(features), int(rest[0]))
        if decoder == "folded" and rest
        else task.build_head(*encoder_dims(encoder), "full")
    )
    return TaskModel(encoder, head)


def timers(model: TaskModel, images: torch.Tensor) -> tuple[Callable[[], float], Callable[[], float]]:
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    target = torch.randint(0, 2, (images.shape[0], *images.shape[-2:]))

    def train() -> float:
        start = time.process_time()
        model.train()
        loss = torch.nn.functional.cross_entropy(model(images), target)  # type: ignore[arg-type]
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tile", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default="light:8,folded:32,folded:32:48")
    add_smoke_flag(parser)
    args = parser.parse_args()
    arch = "micro"
    if args.smoke:
        args.tile, args.batch, args.reps, args.warmup, arch = 32, 2, 2, 1, "nano"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print_cpu()
    print(f"tile {args.tile}, batch {args.batch}, {args.threads} thread(s), {arch} ViT, {args.reps} rounds", flush=True)
    variants = ["light:8", *[v for v in args.variants.split(",") if v != "light:8"]]
    images = torch.randn(args.batch, 3, args.tile, args.tile)
    models = {name: build(name, args.tile, arch) for name in variants}
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
    for name in variants:
        parts = []
        for kind in ("train", "predict"):
            mine, base = seconds[name][kind], seconds["light:8"][kind]
            ratio = statistics.median(m / b for m, b in zip(mine, base, strict=True))
            parts.append(f"{kind} {statistics.median(mine):.3f} CPU-s, ratio {ratio:.2f}")
        params = sum(p.numel() for p in models[name].head.parameters())
        print(f"{name:16s} {'; '.join(parts)}; decoder parameters {params}", flush=True)


if __name__ == "__main__":
    main()
