"""Every arm of a federated fine-tuning comparison (the federation's sites, all images pooled, each
hospital alone) trains with `visionfm finetune`'s recipe for the task: its learning rate, its layer-wise
lr decay (none for segmentation from a scratch encoder) and its least number of optimiser steps, spread
over the rounds, unless the run config sets them. The learning rate is read off the weights: the first
AdamW step moves each parameter by at most its group's rate, and some element by almost exactly that."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from client.finetuning import finetune_round
from client.site import load_site_tasks
from server.federation.finetune_phase import finetune_arrays, resolve_finetune_task
from server.federation.report import MetricsLog
from simulations.baseline_finetune import finetune_alone
from strategies.protocol.task_models import new_tuner, round_steps, task_preprocess
from tests.csv_files import write_csv
from tests.synthetic_fundus import synthetic_fundus
from visionfm_core.models.checkpoint import encoder_metadata, save_encoder
from visionfm_core.pretraining import encoder_spec, initial_global_arrays, new_encoder
from visionfm_core.run_config import RunConfig
from visionfm_core.tasks.adapters import ClassificationTask, SegmentationTask
from visionfm_core.tasks.splits import TaskSplit

SETTINGS = json.dumps({"num_classes": 2, "class_names": ["background", "vessel"], "features": 4})
BASE = {"num-rounds": 1, "local-steps": 1, "batch-size": 8, "arch": "nano", "image-size": 32, "patch-size": 8,
        "modalities": "fundus", "finetune-rounds": 1, "finetune-task": "segmentation",
        "finetune-task-config": SETTINGS, "finetune-batch-size": 8, "ssl.out-dim": 32, "ssl.head-hidden-dim": 32,
        "ssl.head-bottleneck-dim": 16, "ssl.local-crops": 0,
        # Tiny photographs at their own resolution, three tiles of each per epoch.
        "finetune-preprocess": '{"fov_diameter": 0, "crops_per_image": 3}'}
SIZES = [(60, 80), (72, 64), (50, 90), (64, 64), (56, 72), (70, 70)]
DEPTH = 2  # nano's blocks
PATCH = "fundus/backbone.patch_embed.proj.weight"  # layer 0: the most decayed encoder rate
LAST_BLOCK = f"fundus/backbone.blocks.{DEPTH - 1}.mlp.fc2.weight"  # layer DEPTH: one decay factor
HEAD = "fundus/classifier."


def _config(**changes: object) -> RunConfig:
    return resolve_finetune_task(RunConfig.from_flat({**BASE, **{k.replace("_", "-"): v for k, v in changes.items()}}))


def _site(folder: Path, first: int) -> dict[str, object]:
    folder.mkdir()
    rows = []
    for number, size in enumerate(SIZES, start=first):
        image, vessels = synthetic_fundus(size, number)
        Image.fromarray(image).save(folder / f"eye{number}.png")
        Image.fromarray((vessels * 255).astype(np.uint8)).save(folder / f"eye{number}_mask.png")
        rows.append({"image": f"eye{number}.png", "mask": f"eye{number}_mask.png"})
    manifest = write_csv(folder / "vessels.csv", rows)
    return {"data-path": str(folder), "modalities": "fundus", "task-manifest": f"fundus={manifest}"}


@pytest.fixture
def sites(tmp_path: Path) -> list[dict[str, object]]:
    return [_site(tmp_path / "a", 0), _site(tmp_path / "b", 100)]


def _encoders(folder: Path, source_format: str) -> str:
    """An `init-encoders` folder holding one seeded encoder saved as `source_format`."""
    cfg = RunConfig.from_flat(BASE)
    folder.mkdir()
    torch.manual_seed(0)
    save_encoder(folder / "fundus.safetensors", new_encoder(cfg).state_dict(),
                 encoder_metadata(encoder_spec(cfg), "fundus", source_format=source_format))
    return str(folder)


def _first_step(before: dict[str, np.ndarray], after: dict[str, np.ndarray], key: str) -> float:
    return float(np.abs(after[key] - before[key]).max())


def _head_step(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> float:
    return max(_first_step(before, after, k) for k in after if k.startswith(HEAD) and after[k].ndim > 1)


def test_the_server_resolves_the_tasks_recipe_once_for_every_party(tmp_path: Path) -> None:
    scratch = _config(init_encoders=_encoders(tmp_path / "scratch", "scratch"))
    seg = SegmentationTask
    assert (scratch.finetune_lr, scratch.finetune_layer_decay, scratch.finetune_min_steps) == (
        seg.default_lr, seg().default_layer_decay(pretrained=False), seg.default_min_steps)
    assert scratch.finetune_layer_decay == 1.0 and scratch.finetune_lr == 2e-3 and scratch.finetune_min_steps == 800
    # After the pretraining phase, or from learnt encoders, the task's decay for a pretrained encoder.
    for cfg in (_config(), _config(init_encoders=_encoders(tmp_path / "ssl", "ssl"))):
        assert cfg.finetune_layer_decay == seg().default_layer_decay(pretrained=True) == 0.65
        assert cfg.finetune_lr == seg.default_lr
    # Classification keeps its own defaults.
    classify = resolve_finetune_task(RunConfig.from_flat({**{k: v for k, v in BASE.items() if "task" not in k},
                                                           "finetune-classes": "fundus=3"}))
    assert (classify.finetune_lr, classify.finetune_layer_decay, classify.finetune_min_steps) == (
        ClassificationTask.default_lr, 0.65, ClassificationTask.default_min_steps)
    # What the run sets wins, including "no least steps".
    given = _config(finetune_lr=5e-4, finetune_layer_decay=0.8, finetune_min_steps=0,
                    init_encoders=_encoders(tmp_path / "given", "scratch"))
    assert (given.finetune_lr, given.finetune_layer_decay, given.finetune_min_steps) == (5e-4, 0.8, 0)
    # Sites get the resolved values in the message's config, and resolving again changes nothing.
    assert RunConfig.from_flat(scratch.to_flat()) == scratch == resolve_finetune_task(scratch)
    tuner = new_tuner(scratch, "fundus", torch.device("cpu"))
    assert (tuner.config.lr, tuner.config.layer_decay) == (2e-3, 1.0)


@pytest.mark.parametrize(("changes", "lr", "decay"), [
    ({"init_encoders": "scratch"}, 2e-3, 1.0),   # segmentation from scratch: 2e-3, no layer decay
    ({}, 2e-3, 0.65),                            # after pretraining: the pretrained encoder's decay
    ({"init_encoders": "scratch", "finetune_lr": 5e-4, "finetune_layer_decay": 0.5}, 5e-4, 0.5),  # keys win
])
def test_a_site_and_the_baseline_arms_step_at_the_recipes_rates(
        tmp_path: Path, sites: list[dict[str, object]], changes: dict[str, object], lr: float, decay: float) -> None:
    if changes.get("init_encoders") == "scratch":
        changes = {**changes, "init_encoders": _encoders(tmp_path / "init", "scratch")}
    # One optimiser step (one epoch of a single batch, no least steps), taken at the peak rate.
    cfg = _config(finetune_min_steps=0, finetune_preprocess='{"fov_diameter": 0, "crops_per_image": 1}', **changes)
    start = finetune_arrays({k: v.numpy() for k, v in initial_global_arrays(cfg).items()}, cfg)
    expected = {PATCH: lr * decay ** (DEPTH + 1), LAST_BLOCK: lr * decay}

    site = load_site_tasks(sites[0], cfg)
    assert len(site["fundus"].train) * 1 <= cfg.finetune_batch_size  # one batch: one step
    result = finetune_round(site, {k: torch.from_numpy(v) for k, v in start.items()}, cfg, 1, {})
    assert result.metrics["fundus/steps"] == 1
    federated = {k: v.numpy() for k, v in result.arrays.items()}
    for key, step in expected.items():
        assert _first_step(start, federated, key) == pytest.approx(step, rel=0.03), key
    assert _head_step(start, federated) == pytest.approx(lr, rel=0.03)

    # The pooled and hospital-alone arms (simulations/baseline_finetune.py) take the same first step.
    encoders = {k: v for k, v in start.items() if "/backbone." in k}
    alone = finetune_alone("hospital-a", site, cfg, encoders, MetricsLog(tmp_path / "alone"), 0, 0)
    for key, step in expected.items():
        assert _first_step(start, alone, key) == pytest.approx(step, rel=0.03), key
    assert _head_step(start, alone) == pytest.approx(lr, rel=0.03)


def test_every_party_trains_the_least_steps_spread_over_the_rounds(
        tmp_path: Path, sites: list[dict[str, object]]) -> None:
    cfg = _config(finetune_rounds=2, finetune_min_steps=9)
    site = load_site_tasks(sites[0], cfg)
    other = load_site_tasks(sites[1], cfg)["fundus"]
    pooled = {"fundus": TaskSplit("fundus", site["fundus"].train + other.train, site["fundus"].val + other.val)}
    tuner = new_tuner(cfg, "fundus", torch.device("cpu"))
    preprocess = task_preprocess(cfg, tuner.task, "fundus")
    site_epoch = len(tuner.loader(site["fundus"].train, preprocess, train=True))
    pooled_epoch = len(tuner.loader(pooled["fundus"].train, preprocess, train=True))
    assert site_epoch < pooled_epoch < 5  # an epoch is shorter than 9 steps over 2 rounds
    start = {k: torch.from_numpy(v) for k, v in
             finetune_arrays({k: v.numpy() for k, v in initial_global_arrays(cfg).items()}, cfg).items()}

    # A federated site: ceil(9 / 2) = 5 steps each round, whatever its epoch (the last pass cut short).
    for server_round in (1, 2):
        assert finetune_round(site, start, cfg, server_round, {}).metrics["fundus/steps"] == 5

    # The pooled arm trains as many steps per round, though its epoch is longer.
    log = MetricsLog(tmp_path / "pooled")
    encoders = {k: v.numpy() for k, v in start.items() if "/backbone." in k}
    finetune_alone("centralized", pooled, cfg, encoders, log, 0, 0)
    assert [r["steps"] for r in log.rows if r["phase"] == "finetune"] == [5, 5]

    # Without least steps (finetune-min-steps 0), each party trains its own epochs, as before.
    bare = cfg.replace(finetune_min_steps=0)
    assert finetune_round(site, start, bare, 1, {}).metrics["fundus/steps"] == site_epoch
    log = MetricsLog(tmp_path / "pooled-epochs")
    finetune_alone("centralized", pooled, bare, encoders, log, 0, 0)
    assert [r["steps"] for r in log.rows if r["phase"] == "finetune"] == [pooled_epoch] * 2

    # The task's own least steps (800 for segmentation), spread over the rounds; more epochs win.
    default = _config(finetune_rounds=3)
    assert default.finetune_min_steps == SegmentationTask.default_min_steps
    assert round_steps(default, site_epoch) == math.ceil(800 / 3)
    assert round_steps(default.replace(finetune_epochs=1000), site_epoch) == 1000 * site_epoch
