"""CPU cost of one segmentation training step with each from-scratch encoder, against the micro ViT.

One step as `visionfm finetune --task segmentation` takes it from scratch: a batch of 224-px tiles
through the encoder and the task's decoder, the loss, backward and AdamW. The encoders are timed
interleaved (micro, the next, micro, ...) in one process, so load from other processes hits them alike;
the clock is this process's CPU time, and the median over the rounds is reported with the minimum.
Each line prints `ratio` = the median step against micro's; the encoder's parameter count beside it.

Usage: python bench/bench_seg_encoder_step.py [--encoders micro:16 mini:16 micro:8] [--rounds 8]
                                              [--batch-size 8] [--image-size 224] [--threads 1]
Smoke (tiny sizes, seconds): --smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import add_smoke_flag, print_cpu

from visionfm_core.models.encoders import EncoderSpec, create_encoder
from visionfm_core.models.heads import TaskModel
from visionfm_core.tasks.adapters import SegmentationTask


def build(arch: str, patch: int, image_size: int) -> tuple[TaskModel, torch.optim.Optimizer, int]:
    spec = EncoderSpec(arch=arch, image_size=image_size, patch_size=patch)
    torch.manual_seed(0)
    model = TaskModel(create_encoder(spec), SegmentationTask(2).build_head(spec.embed_dim, spec.depth, patch, "full"))
    return model, torch.optim.AdamW(model.parameters()), sum(p.numel() for p in model.encoder.parameters())


def step_seconds(model: TaskModel, optimiser: torch.optim.Optimizer, task: SegmentationTask, images: torch.Tensor,
                 masks: torch.Tensor) -> float:
    start = time.process_time()
    logits = model(images)
    loss = task.loss(logits, {"mask": masks})  # type: ignore[arg-type]
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=["micro:16", "mini:16", "micro:8"],
                        help="arch:patch, the first one is the baseline")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    add_smoke_flag(parser)
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.batch_size, args.image_size = 2, 2, 32
    torch.set_num_threads(args.threads)
    print_cpu()
    task = SegmentationTask(2)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    masks = (torch.rand(args.batch_size, args.image_size, args.image_size) < 0.1).long()
    models = {}
    for name in args.encoders:
        arch, patch = name.split(":")
        models[name] = build(arch, int(patch), args.image_size)
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_number in range(args.rounds + 1):  # round 0 warms up, not counted
        for name, (model, optimiser, _) in models.items():
            seconds = step_seconds(model, optimiser, task, images, masks)
            if round_number:
                times[name].append(seconds)
    baseline = statistics.median(times[args.encoders[0]])
    print(f"one step, batch {args.batch_size} x {args.image_size} px, {args.threads} thread(s), {args.rounds} rounds, "
          f"CPU-s of this process")
    for name, (_, _, params) in models.items():
        median = statistics.median(times[name])
        print(f"{name:>10}: encoder {params / 1e6:.2f} M parameters, step median {median:.3f} s (min "
              f"{min(times[name]):.3f}), ratio {median / baseline:.2f} against {args.encoders[0]}", flush=True)


if __name__ == "__main__":
    main()
