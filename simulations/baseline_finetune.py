"""The fine-tuning phase of the centralized and local-only arms.

The same task, head, optimiser, schedule and augmentation as a federated site (`client/finetuning.py`),
and the same optimiser steps per round (`round_steps`: finetune-epochs passes, or more to reach the task's
least steps), but one site training without interruption through all finetune-rounds from the arm's
pretrained (or given) encoders. Rows are written at the same round marks as a federation's: training
loss ("finetune"), and scores ("finetune-evaluate") on the site's validation split and, as
`<arm>:global-test`, on the held-out data the federation's server scores.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from client.finetuning import dp_finetune_round
from client.privacy.accountant import PrivacyBudgetExceeded
from client.privacy.reporting import releasable_metrics
from client.site import load_site_tasks
from server.federation.finetune_phase import TaskTestEvaluator, resolve_finetune_task, task_test_evaluator
from server.federation.report import MetricsLog
from simulations.arm_privacy import ArmPrivacy
from strategies.protocol.scenario import Scenario
from strategies.protocol.task_models import (
    CLASSIFIER_PREFIX,
    build_task_model,
    finetune_encoder_arrays,
    new_tuner,
    reported_scores,
    resolve_recipe,
    round_steps,
    shareable,
    task_preprocess,
    train_steps,
)
from visionfm_core.models.heads import TaskModel
from visionfm_core.pretraining import BACKBONE_PREFIX, modality_arrays
from visionfm_core.run_config import RunConfig
from visionfm_core.runtime import resolve_device, seed_everything
from visionfm_core.tasks.data import Preprocess
from visionfm_core.tasks.splits import TaskSplit
from visionfm_core.tasks.trainer import FineTuner, TrainState, get_weights


@dataclass
class _Run:
    tuner: FineTuner
    model: TaskModel
    state: TrainState
    loader: DataLoader[Any]
    preprocess: Preprocess
    split: TaskSplit
    steps: int  # optimiser steps per round


def site_tasks(cfg: RunConfig, index: int) -> dict[str, TaskSplit]:
    """Simulated site `index`'s task samples for the run's fine-tuning task."""
    return load_site_tasks({"partition-id": index}, cfg)


def pooled_tasks(scenario: Scenario, cfg: RunConfig) -> dict[str, TaskSplit]:
    """Every site's task samples pooled per modality, each keeping its train/validation side."""
    pooled: dict[str, TaskSplit] = {}
    for index in range(len(scenario.sites)):
        for modality, split in site_tasks(cfg, index).items():
            target = pooled.setdefault(modality, TaskSplit(modality, [], []))
            target.train.extend(split.train)
            target.val.extend(split.val)
    return pooled


def finetune_alone(label: str, tasks: Mapping[str, TaskSplit], cfg: RunConfig, pretrained: Mapping[str, np.ndarray],
                   log: MetricsLog, round_offset: int, seed_offset: int,
                   privacy: ArmPrivacy | None = None) -> dict[str, np.ndarray]:
    """Fine-tune each modality's encoder on `tasks` as one site; returns encoder and head arrays. Under DP
    (`privacy`) each round is DP-SGD charged to the arm's ledger, as a federated site's is, and only the
    held-out test split is scored."""
    cfg = resolve_finetune_task(cfg)
    device = resolve_device(cfg.device)
    evaluator: TaskTestEvaluator | None = task_test_evaluator(cfg) if cfg.server_eval == "scenario" else None
    # On the fine-tuning input's patch grid, as the federated arm's global model is.
    grid = finetune_encoder_arrays({k: np.asarray(v, dtype=np.float32) for k, v in pretrained.items()
                                    if k.split("/", 1)[1].startswith(BACKBONE_PREFIX)}, cfg)
    encoders = {k: torch.from_numpy(v) for k, v in grid.items()}
    runs: dict[str, _Run] = {}
    for modality, split in tasks.items():
        shared = modality_arrays(encoders, modality)
        if not shared or not split.train:
            continue
        tuner = new_tuner(cfg, modality, device)
        tuner.task.check(split.train + split.val)
        model = build_task_model(tuner, cfg, shared, None, modality)  # the same seeded head a federation starts from
        tuner.config.seed = cfg.seed + seed_offset
        seed_everything(tuner.config.seed)
        preprocess = task_preprocess(cfg, tuner.task, modality)
        loader = tuner.loader(split.train, preprocess, train=True)
        steps = round_steps(resolve_recipe(cfg, tuner.task), len(loader))  # as many per round as a site's
        runs[modality] = _Run(tuner, model, tuner.init_state(model, cfg.finetune_rounds * steps, start_step=0,
                                                             steps_per_epoch=len(loader)),
                              loader, preprocess, split, steps)
    arrays: dict[str, np.ndarray] = {}
    for finetune_round in range(1, cfg.finetune_rounds + 1):
        row_round = round_offset + finetune_round
        for modality, run in runs.items():
            if privacy is not None:
                try:
                    budget = privacy.budget_for(modality)
                    stats = dp_finetune_round(run.tuner, run.model, cfg, finetune_round, run.split.train,
                                              run.split.val, run.preprocess, budget, privacy.ledger, modality)
                except PrivacyBudgetExceeded:
                    log.add(row_round, label, modality, "finetune", {"budget-exhausted": 1.0,
                                                                      "finetune-round": finetune_round})
                    continue
                log.add(row_round, label, modality, "finetune", {**releasable_metrics(stats),
                                                                  "num-examples": float(len(run.split.train)),
                                                                  "finetune-round": finetune_round})
            else:
                stats = train_steps(run.tuner, run.state, run.loader, run.steps)
                log.add(row_round, label, modality, "finetune", {"finetune-loss": stats["loss"],
                                                                  "steps": stats["steps"],
                                                                  "num-examples": float(len(run.split.train)),
                                                                  "finetune-round": finetune_round})
            arrays.update(_model_arrays(modality, run.model))
        if finetune_round % cfg.eval_every == 0 or finetune_round == cfg.finetune_rounds:
            for modality, run in runs.items():
                if run.split.val and privacy is None:
                    scores = run.tuner.evaluate(run.model, run.tuner.loader(run.split.val, run.preprocess, train=False),
                                                flips=run.preprocess.test_flips)
                    if evaluator is not None and "best_threshold" in scores:
                        # The arm's own validation picks the threshold its held-out test is scored with.
                        evaluator.thresholds[modality] = float(scores["best_threshold"])
                    log.add(row_round, label, modality, "finetune-evaluate",
                            {**reported_scores(cfg.finetune_task, scores), "finetune-round": finetune_round})
            if evaluator is not None:
                for modality, values in evaluator(arrays).items():
                    log.add(row_round, f"{label}:global-test", modality, "finetune-evaluate",
                            {**values, "finetune-round": finetune_round})
        log.save()
    return arrays


def _model_arrays(modality: str, model: TaskModel) -> dict[str, np.ndarray]:
    encoder = shareable(get_weights(model, "encoder"))
    head = shareable(get_weights(model, "head"))
    return {**{f"{modality}/{BACKBONE_PREFIX}{k}": v.numpy() for k, v in encoder.items()},
            **{f"{modality}/{CLASSIFIER_PREFIX}{k}": v.numpy() for k, v in head.items()}}
