"""bench_federated_tasks records the recipe the arms train with, resolved from the run config as the server
resolves it, also when an invocation runs only the baseline arms (which write no config.json): the task's
lr, layer decay and least steps where the bench leaves them to the task, and the tiles a step really takes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))  # the bench imports its helper module `_bench` as a script does

from bench.bench_federated_tasks import random_encoder, recipe, run_overrides, scenario_file  # noqa: E402


def _args(**given: object) -> argparse.Namespace:
    values: dict[str, object] = {"rounds": 8, "epochs": 1, "min_steps": None, "sites": 3, "sites_at_once": 1,
                                 "threads": 1, "batch": None, "lr": None, "layer_decay": None, "server_lr": None,
                                 "seed": 0, "image_size": 64, "eval_every": 0}
    values.update(given)
    return argparse.Namespace(**values)


def test_the_task_defaults_are_resolved_for_a_scratch_encoder(tmp_path: Path) -> None:
    args = _args()
    scenario = scenario_file(tmp_path, args.sites, args.sites_at_once)
    encoders = random_encoder(tmp_path / "init", args.image_size, args.seed)
    resolved = recipe(scenario, run_overrides("hrf-vessels", args, encoders))
    # Segmentation's own recipe (800 steps, lr 2e-3, no layer decay from scratch); the run config's batch of
    # 32 is capped at the 8 tiles a segmentation step takes.
    assert resolved == {"finetune-rounds": 8, "finetune-epochs": 1, "finetune-min-steps": 800,
                        "finetune-lr": 0.002, "finetune-layer-decay": 1.0, "finetune-batch-size": 8,
                        "finetune-server-lr": 1.0, "image-size": 64}


def test_values_the_bench_sets_win(tmp_path: Path) -> None:
    args = _args(min_steps=480, lr=3e-3, batch=4, server_lr=1.5)
    scenario = scenario_file(tmp_path, args.sites)
    encoders = random_encoder(tmp_path / "init", args.image_size, args.seed)
    resolved = recipe(scenario, run_overrides("hrf-vessels", args, encoders))
    assert (resolved["finetune-min-steps"], resolved["finetune-lr"], resolved["finetune-batch-size"],
            resolved["finetune-server-lr"]) == (480, 3e-3, 4, 1.5)
