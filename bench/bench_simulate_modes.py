"""Probe scores of the default simulation in all three modes against the random encoder (round 0).

Runs `visionfm simulate` in federated, centralized and local-only mode on the same scenario, data and
compute budget, and prints k-NN / linear-probe accuracy and macro AUC on the held-out test split at
round 0 (the random encoder) and after the last round, with the difference.

    python bench/bench_simulate_modes.py [--scenario default] [--rounds N] [--local-steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _bench import add_smoke_flag, print_cpu

from simulations.compare import comparison_rows, write_comparison
from simulations.simulate import MODES, quiet_framework_logs, simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="default")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--local-steps", type=int)
    parser.add_argument("--teacher-sync", choices=["ema", "reset"])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-modes"))
    add_smoke_flag(parser)
    args = parser.parse_args()
    if args.smoke:  # the quick scenario, one round of one step; the centralized arm needs no Ray
        args.scenario, args.rounds, args.local_steps, args.modes = "quick", 1, 1, "centralized,local"
    print_cpu()
    quiet_framework_logs()
    overrides = {"num-rounds": args.rounds, "local-steps": args.local_steps, "teacher-sync": args.teacher_sync}
    logs, seconds = {}, {}
    for mode in args.modes.split(","):
        started = time.perf_counter()
        logs[mode] = simulate(args.scenario, mode, args.out / mode, overrides).metrics
        seconds[mode] = time.perf_counter() - started
    rows = comparison_rows(logs)
    write_comparison(args.out, rows)
    print(f"{'mode':12} {'arm':12} {'modality':8} {'metric':16} {'random':>7} {'trained':>8} {'delta':>7}")
    for row in rows:
        for metric in ("knn_accuracy", "knn_auc", "linear_accuracy", "linear_auc"):
            base, value = row[f"{metric}_round0"], row[metric]
            print(f"{row['mode']:12} {row['arm']:12} {row['modality']:8} {metric:16} {base:7.3f} {value:8.3f} "
                  f"{value - base:+7.3f}")
    first = next(iter(seconds))
    for mode, secs in seconds.items():
        print(f"{mode}: {secs:.0f}s wall, ratio to {first} {secs / seconds[first]:.2f}")


if __name__ == "__main__":
    main()
