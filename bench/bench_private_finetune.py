"""DP fine-tuning vs non-private fine-tuning (target: a DP step <= 2x a non-private one), and what the
site's privacy ledger adds to a DP fine-tuning round (target: under 1%).

Part 1, one fine-tuning step of the federated phase's own trainer (`strategies.protocol.task_models.new_tuner`: task
model, AdamW groups, schedule), on the same in-memory images: `FineTuner.train_epochs` (shuffled
batches of `--batch`) against `DPFineTuner.train_steps` (Poisson batches of `--batch` expected images,
per-sample clipping, secure noise), per step, for a frozen encoder (head only) and a trained one. Each
repetition times both (order alternating) and gives a paired ratio; medians are printed.

Part 2, a whole DP fine-tuning round at a site (`client.finetuning.finetune_round`, images read from
PNG files, ledger included) against the ledger's own work in it (hashing the images, cached by file
stat, then verifying the ledger and charging the round), on a ledger that already holds `--history`
entries dated over the past years.

Usage: python bench/bench_private_finetune.py [--arch micro] [--image-size 64] [--images 96] [--batch 16]
       [--reps 5] [--history 400] [--smoke]
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _bench import cpu_model
from PIL import Image

from client.finetuning import dp_finetune_steps, finetune_round
from client.privacy.accountant import PrivacyBudget, SiteAccountant
from client.privacy.charging import LedgerScope
from client.privacy.dp_finetune import DPFineTuner
from client.privacy.ledger import Charge, LedgerBook, image_digests
from server.federation.finetune_phase import finetune_arrays, resolve_finetune_task
from strategies.protocol.dp_config import DPConfig
from strategies.protocol.task_models import build_task_model, new_tuner
from visionfm_core.data.items import ImageItem
from visionfm_core.pretraining import initial_global_arrays, modality_arrays
from visionfm_core.run_config import RunConfig
from visionfm_core.tasks.data import Preprocess
from visionfm_core.tasks.samples import TaskSample
from visionfm_core.tasks.splits import TaskSplit


def run_config(args: argparse.Namespace, encoder: str) -> RunConfig:
    return resolve_finetune_task(RunConfig.from_flat({
        "arch": args.arch, "image-size": args.image_size, "patch-size": args.patch_size, "modalities": "fundus",
        "finetune-rounds": 10, "finetune-epochs": 1, "finetune-batch-size": args.batch, "finetune-classes": "fundus=5",
        "finetune-encoder": encoder, "dp": True, "privacy.noise-multiplier": 1.0,
        "privacy.expected-batch-size": args.batch, "privacy.center": "fixed"}))


def samples(folder: Path, count: int, size: int) -> list[TaskSample]:
    """`count` random RGB images written as PNG files (the deployment path: read and hashed from disk)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        path = folder / f"img{i:04d}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        out.append(TaskSample(ImageItem(str(path), label=i % 5), label=i % 5))
    return out


def timed(fn: Callable[[], float]) -> float:
    """Seconds per step: `fn` runs some steps and returns how many."""
    started = time.perf_counter()
    steps = fn()
    return (time.perf_counter() - started) / max(steps, 1.0)


def step_ratio(args: argparse.Namespace, train: list[TaskSample], encoder: str) -> tuple[float, float, float]:
    """Median seconds per step (non-private, DP) and the median paired ratio."""
    cfg = run_config(args, encoder)
    torch.set_num_threads(args.threads)
    shared = {k: v for k, v in modality_arrays(initial_global_arrays(cfg), "fundus").items()}
    preprocess = Preprocess.for_modality("fundus", cfg.image_size)
    tuner = new_tuner(cfg, "fundus", torch.device("cpu"))
    tuner.config.mixed_precision = False
    plain_model = build_task_model(tuner, cfg, shared, None, "fundus")
    plain_state = tuner.init_state(plain_model, 10_000)
    plain_loader = tuner.loader(train, preprocess, train=True)
    dp_model = build_task_model(tuner, cfg, shared, None, "fundus")
    dp_state = tuner.init_state(dp_model, 10_000)
    dp = DPConfig.from_dict(cfg.privacy)
    private = DPFineTuner(tuner, dp, SiteAccountant(PrivacyBudget(math.inf, 1e-5)))
    dp_loader = private.loader(train, preprocess)
    steps = max(1, len(train) // args.batch)

    def plain() -> float:
        return float(tuner.train_epochs(plain_state, plain_loader, 1)["steps"])

    def noisy() -> float:
        private.train_steps(dp_state, dp_loader, steps)
        return float(steps)

    plain(), noisy()  # warm-up: allocator, vmap tracing
    plains, dps, ratios = [], [], []
    for rep in range(args.reps):
        order = (plain, noisy) if rep % 2 == 0 else (noisy, plain)
        times = {fn.__name__: timed(fn) for fn in order}
        plains.append(times["plain"])
        dps.append(times["noisy"])
        ratios.append(times["noisy"] / times["plain"])
    return statistics.median(plains), statistics.median(dps), statistics.median(ratios)


def fill_ledger(book: LedgerBook, members: list[str], entries: int) -> None:
    """`entries` earlier charges, one a week back over the years (small: they must leave budget room)."""
    now = time.time()
    for index in range(entries):
        book.clock = lambda index=index: now - (entries - index) * 7 * 86400  # type: ignore[misc]
        charge = Charge(index // 4, "pretrain", index % 4 + 1, 5.0, 0.01, 1)
        book.charge(members, "fundus", charge, PrivacyBudget(1e6, 1e-5))
    book.clock = time.time


def ledger_ratio(args: argparse.Namespace, train: list[TaskSample], val: list[TaskSample],
                 work: Path) -> tuple[float, float, float]:
    """Median seconds of a DP round (ledger included), of the ledger's work alone, and their ratio."""
    cfg = run_config(args, args.round_encoder)
    arrays = {k: torch.from_numpy(v) for k, v in
              finetune_arrays({k: v.numpy() for k, v in initial_global_arrays(cfg).items()}, cfg).items()}
    site = {"fundus": TaskSplit("fundus", train, val)}
    budget = PrivacyBudget(1e6, 1e-5)
    members = image_digests([s.item for s in [*train, *val]])
    dp = DPConfig.from_dict(cfg.privacy)
    rate, steps = dp.expected_batch_size / len(train), dp_finetune_steps(cfg, dp, len(train))
    for name in ("round", "alone"):
        fill_ledger(LedgerBook(work / name), members, args.history)
    rounds, ledgers, ratios, first = [], [], [], 0.0
    for rep in range(args.reps + 1):
        started = time.perf_counter()
        finetune_round(site, arrays, cfg, rep + 1, {}, budget=budget, ledger=LedgerScope(LedgerBook(work / "round"), 1))
        round_s = time.perf_counter() - started
        started = time.perf_counter()
        book = LedgerBook(work / "alone")
        digests = image_digests([s.item for s in [*train, *val]], book.folder)
        # The round's own mechanism: its RDP is what the trainer evaluates anyway (cached per process).
        book.charge(digests, "fundus", Charge(1, "finetune", rep + 1, 1.0, rate, steps), budget)
        ledger_s = time.perf_counter() - started
        if rep:
            rounds.append(round_s)
            ledgers.append(ledger_s)
            ratios.append(ledger_s / round_s)
        else:  # a site's first round: every image is hashed once (later rounds read the cached hashes)
            first = ledger_s / round_s
    print(f"first round (every image hashed): ledger {first:.2%} of the round")
    return statistics.median(rounds), statistics.median(ledgers), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="micro")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--history", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--round-encoder", default="trained", choices=("trained", "frozen"),
                        help="part 2's round: the run-config default (trained encoder) or a frozen one")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    args = parser.parse_args()
    if args.smoke:
        args.arch, args.image_size, args.images, args.batch, args.reps, args.history = "nano", 32, 16, 8, 1, 20
    print(f"CPU: {cpu_model()}; torch threads {args.threads}; arch {args.arch}, {args.image_size} px, "
          f"{args.images} images, batch {args.batch}, {args.reps} reps")
    work = Path(tempfile.mkdtemp(prefix="bench-private-ft-"))
    try:
        data = samples(work / "images", args.images + args.images // 4, args.image_size)
        train, val = data[: args.images], data[args.images:]
        for encoder in ("frozen", "trained"):
            plain_s, dp_s, ratio = step_ratio(args, train, encoder)
            print(f"fine-tuning step, encoder {encoder}: non-private {plain_s * 1e3:.1f} ms, "
                  f"DP-SGD {dp_s * 1e3:.1f} ms; ratio {ratio:.2f}x (target <= 2x)")
        round_s, ledger_s, share = ledger_ratio(args, train, val, work / "ledgers")
        print(f"DP fine-tuning round (encoder {args.round_encoder}) {round_s:.2f} s, "
              f"ledger work in it {ledger_s * 1e3:.1f} ms "
              f"({args.history} earlier entries); ledger ratio {share:.4f} = {share:.2%} of the round (target < 1%)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
