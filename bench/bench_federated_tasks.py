"""Federated fine-tuning of segmentation, landmarks and detection on the bundled sets (issue #3).

    .venv/bin/python bench/bench_federated_tasks.py [--tasks hrf-vessels,hrf-disc,idrid-disc]
        [--rounds 6] [--epochs 1] [--min-steps N] [--sites 3] [--sites-at-once 1] [--out results.json]

For each bundled task set (strategies/protocol/task_sets.py), three arms start from the same randomly
initialised micro ViT and the same seeded task head, and train with the same recipe: the task's own
learning rate and layer decay (`visionfm finetune`'s, unless --lr / --layer-decay set them) and the same
optimiser steps per round at every training party (`--epochs` local passes, or more so that each party
trains at least `--min-steps` over all rounds; default: the task's `--min-steps`):
- federated: a real `visionfm simulate` run (Flower's simulation engine) with `--sites` fundus
  hospitals holding equal shares of the set; the averaged encoder and head are scored every round;
- centralized: `visionfm simulate --mode centralized`, every hospital's training images pooled at one
  site;
- local: `--mode local`, each hospital alone on its own share (mean, worst and best over the hospitals).
All arms train with the same task head, optimiser, schedule and augmentation (`client/finetuning.py`,
no model selection) and are scored on the set's held-out quarter of the photographs, which nothing
trains or selects on. Headline metrics: vessel Dice (higher is better), optic-disc mean radial
error in the bundled images' pixels (lower is better), optic-disc box mAP@0.5 (higher is better).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _bench import add_smoke_flag, print_cpu  # noqa: E402

from server.federation.finetune_phase import finetune_modalities, resolve_finetune_task  # noqa: E402
from simulations.simulate import simulate  # noqa: E402
from strategies.protocol.scenario import load_scenario, resolve_config  # noqa: E402
from strategies.protocol.task_models import HEADLINE, task_adapter  # noqa: E402
from strategies.protocol.task_sets import TASK_SETS, load_task_set  # noqa: E402
from visionfm_core.models.checkpoint import encoder_metadata, save_encoder  # noqa: E402
from visionfm_core.models.encoders import EncoderSpec, create_encoder  # noqa: E402
from visionfm_core.runtime import seed_everything  # noqa: E402

SIZES = {"hrf-vessels": 256, "hrf-disc": 128, "idrid-disc": 128}
LOWER_IS_BETTER = {"mre"}


def scenario_file(folder: Path, sites: int, at_once: int = 0) -> Path:
    """A scenario of `sites` fundus hospitals; with `at_once`, each reserves this machine's CPUs / at_once,
    so that Ray runs at most that many sites side by side (on a shared machine, one at a time)."""
    lines = ['name = "bench-tasks"', "[datasets]", 'fundus = "retinamnist"']
    if at_once:
        lines += ["[resources]", f"num-cpus = {max(1, os.cpu_count() or 1) / at_once}", "num-gpus = 0"]
    for index in range(sites):
        lines += ["[[sites]]", f'name = "hospital-{chr(ord("a") + index)}"', 'modalities = ["fundus"]']
    path = folder / "scenario.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def random_encoder(folder: Path, size: int, seed: int) -> Path:
    """The arms' common starting point: a seeded, untrained micro ViT saved as `fundus.safetensors`."""
    folder.mkdir(parents=True)
    seed_everything(seed)
    spec = EncoderSpec("micro", size, 16)
    save_encoder(folder / "fundus.safetensors", create_encoder(spec).state_dict(),
                 encoder_metadata(spec, "fundus", source_format="scratch"))
    return folder


def image_size(name: str, args: argparse.Namespace) -> int:
    return int(args.image_size or SIZES[name])


def run_overrides(name: str, args: argparse.Namespace, encoders: Path) -> dict[str, Any]:
    # Every arm fine-tunes through `visionfm finetune`'s pipeline (the task's preprocessing defaults:
    # dense tasks on tiles, scored on whole photographs at their own resolution with the threshold the
    # arm's validation chose) and its recipe (lr, layer decay, least steps) unless an option sets it; the
    # held-out test is scored every `--eval-every` rounds and at the end.
    overrides: dict[str, Any] = {
        "arch": "micro", "patch-size": 16, "image-size": image_size(name, args), "modalities": "fundus",
        "num-rounds": 1, "local-steps": 1, "finetune-rounds": args.rounds, "finetune-epochs": args.epochs,
        "finetune-data": name, "init-encoders": str(encoders), "seed": args.seed,
        "eval-every": args.eval_every or args.rounds, "client-threads": args.threads}
    given = {"finetune-batch-size": args.batch, "finetune-lr": args.lr, "finetune-layer-decay": args.layer_decay,
             "finetune-min-steps": args.min_steps, "finetune-server-lr": args.server_lr}
    overrides.update({k: v for k, v in given.items() if v is not None})
    return overrides


RECIPE_KEYS = ("finetune-rounds", "finetune-epochs", "finetune-min-steps", "finetune-lr", "finetune-layer-decay",
               "finetune-batch-size", "finetune-server-lr", "image-size")


def recipe(scenario: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """The recipe every arm trains with, resolved from the run config as the server resolves it (the task's
    lr, layer decay and least steps where the run leaves them to the task), whichever arms this invocation
    runs (only the federation writes a config.json). The batch is the tiles a step actually takes: the
    run's, capped at the task's largest (as every fine-tuning party caps it)."""
    cfg = resolve_finetune_task(resolve_config(load_scenario(str(scenario)), str(scenario), overrides))
    flat = cfg.to_flat()
    values = {k: flat[k] for k in RECIPE_KEYS if k in flat}
    cap = task_adapter(cfg, finetune_modalities(cfg)[0]).max_batch_size
    if cap is not None:
        values["finetune-batch-size"] = min(int(values["finetune-batch-size"]), cap)
    return values


def arm_steps(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Optimiser steps each training party took over all rounds (from the "finetune" rows)."""
    steps: dict[str, float] = {}
    for row in rows:
        if row["phase"] == "finetune" and "steps" in row:
            steps[str(row["site"])] = steps.get(str(row["site"]), 0.0) + float(row["steps"])
    return steps


def held_out_series(rows: list[dict[str, Any]], metric: str) -> dict[str, list[float]]:
    """Per arm label, the headline metric on the held-out part after each fine-tune round."""
    series: dict[str, list[float]] = {}
    for row in sorted(rows, key=lambda r: r["round"]):
        if row["phase"] == "finetune-evaluate" and str(row["site"]).endswith("global-test"):
            label = str(row["site"]).removesuffix("global-test").rstrip(":") or "federated"
            series.setdefault(label, []).append(round(float(row[metric]), 4))
    return series


def held_out_thresholds(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per arm label, the decision threshold its last held-out score was taken at (dense binary tasks: chosen
    on validation, the sites' weighted mean for the federated model); labels without one are left out."""
    chosen: dict[str, float] = {}
    for row in sorted(rows, key=lambda r: r["round"]):
        if row["phase"] == "finetune-evaluate" and str(row["site"]).endswith("global-test") and "threshold" in row:
            label = str(row["site"]).removesuffix("global-test").rstrip(":") or "federated"
            chosen[label] = round(float(row["threshold"]), 4)
    return chosen


def bench_task(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    task_set = load_task_set(name)
    folder = work / name
    folder.mkdir()
    scenario = scenario_file(folder, args.sites, args.sites_at_once)
    encoders = random_encoder(folder / "init", image_size(name, args), args.seed)
    overrides = run_overrides(name, args, encoders)
    headline = HEADLINE[task_set.task][0]
    result: dict[str, Any] = {"task": task_set.task, "metric": headline, "image_size": image_size(name, args),
                              "pool": len(task_set.pool), "test": len(task_set.test),
                              "config": recipe(scenario, overrides)}
    for mode in args.arms.split(","):
        started = time.perf_counter()
        cpu_started = time.process_time()
        outcome = simulate(str(scenario), mode, folder / mode, overrides=overrides)
        series = held_out_series(outcome.metrics.rows, headline)
        thresholds = held_out_thresholds(outcome.metrics.rows)
        seconds = round(time.perf_counter() - started, 1)
        # This process's CPU only: the federated arm's sites run in Ray workers (see the load in the notes).
        timing = {"seconds": seconds, "cpu_seconds_here": round(time.process_time() - cpu_started, 1),
                  "steps": arm_steps(outcome.metrics.rows), "load_after": round(os.getloadavg()[0], 2)}
        if mode == "local":
            last = {site: values[-1] for site, values in series.items()}
            ranked = sorted(last.values(), reverse=headline not in LOWER_IS_BETTER)
            result["local"] = {"per_site": last, "mean": round(sum(ranked) / len(ranked), 4), "best": ranked[0],
                               "worst": ranked[-1], "per_round": series, **timing}
            if thresholds:
                result["local"]["thresholds"] = thresholds
        else:
            values = series[mode]
            result[mode] = {"test": values[-1], "per_round": values, **timing}
            if mode in thresholds:
                result[mode]["threshold"] = thresholds[mode]
    return result


def print_entry(name: str, entry: dict[str, Any]) -> None:
    """The arms' held-out scores, and the federated / centralized ratio when both ran."""
    fed = entry.get("federated", {}).get("test")
    central = entry.get("centralized", {}).get("test")
    parts = [f"{name:12s} {entry['metric']:6s}"]
    if fed is not None:
        parts.append(f"federated {fed:.4f} (rounds {entry['federated']['per_round']})")
    if central is not None:
        parts.append(f"centralized {central:.4f}")
    if "local" in entry:
        local = entry["local"]
        parts.append(f"local mean {local['mean']:.4f} [{local['worst']:.4f} worst, {local['best']:.4f} best]")
    print(" ".join(parts), flush=True)
    if fed is not None and central is not None:
        print(f"{name:12s} ratio federated / centralized {entry['metric']} = "
              f"{fed / central if central else float('nan'):.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASK_SETS))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=1, help="local passes per round (at least)")
    parser.add_argument("--min-steps", type=int, help="least optimiser steps per training party over all rounds "
                                                      "(default: the task's, as `visionfm finetune --min-steps`)")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--arms", default="federated,centralized,local",
                        help="which arms to run (e.g. federated alone, to try a federated setting)")
    parser.add_argument("--sites-at-once", type=int, default=0, help="at most this many simulated sites train "
                                                                     "side by side (default: Ray's choice)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per site (0: torch's choice)")
    parser.add_argument("--batch", type=int, help="fine-tuning batch (default: the run config's, capped by the task)")
    parser.add_argument("--lr", type=float, help="default: the task's")
    parser.add_argument("--layer-decay", type=float, help="default: the task's")
    parser.add_argument("--server-lr", type=float, help="federated: the server's step along the sites' averaged "
                                                        "update (default 1: plain FedAvg)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=0, help="tile / input size (default: per task)")
    parser.add_argument("--eval-every", type=int, default=0, help="score the held-out test every N rounds "
                                                                   "(default: only after the last)")
    parser.add_argument("--out", type=Path)
    add_smoke_flag(parser)
    args = parser.parse_args()
    if args.smoke:  # one task, one round of one epoch, two hospitals (the three arms still run)
        args.tasks, args.rounds, args.epochs, args.sites, args.min_steps = "hrf-disc", 1, 1, 2, 0
    print_cpu()
    # Ray starts its workers (the simulated sites) 15 nicer than this process, while the pooled and local
    # arms train in this process: on a shared machine the federated arm would run at a lower priority and
    # its wall time would not compare. The sites keep this process's priority instead.
    os.environ.setdefault("RAY_worker_niceness", "0")
    torch.set_num_threads(args.threads or 2)
    print(f"load average (1 min) at start: {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "out"},
                               "load_at_start": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="visionfm-bench-tasks-") as work:
        for name in args.tasks.split(","):
            results[name] = entry = bench_task(name.strip(), args, Path(work))
            print_entry(name, entry)
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
