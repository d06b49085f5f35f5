"""The site's side of one federated fine-tuning round, without any Flower types.

Arrays are keyed like the pretraining phase's: `<modality>/backbone.<timm key>` for the global encoder
and `<modality>/classifier.<key>` for the task head (the prefix predates the other tasks and stays, so
older fine-tune checkpoints still resume). The run's task is any of the task adapters: classification
(sized by `finetune-classes`) or a task whose settings travel as `finetune-task-config`, so every site
and the server build the same head. `finetune_round` builds the task model from the global encoder and
either the global (shared) head or the site's own (personal) head, trains `finetune-epochs` (or the
steps `finetune-min-steps` asks for, see `round_steps`) on the site's labelled train split and returns
only what the config shares: the encoder when it is trained, the head when it is shared. A personal
head comes back in `local_heads`, which the Flower handler keeps in the node's state and never sends.
`finetune_evaluate` scores the global (or personalised) model on the site's labelled validation split.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor

from client.privacy.accountant import PrivacyBudget, PrivacyBudgetExceeded, SiteAccountant
from client.privacy.charging import LedgerScope, charge_round, require_ledger
from client.privacy.dp_finetune import DPFineTuner
from client.privacy.ledger import image_digests
from client.privacy.reporting import releasable_metrics
from strategies.protocol.dp_config import DPConfig
from strategies.protocol.task_models import (
    CLASSIFIER_PREFIX,
    build_task_model,
    new_tuner,
    reported_scores,
    resolve_recipe,
    round_steps,
    shareable,
    task_preprocess,
    train_steps,
)
from visionfm_core.distributed import DistContext, worker_device
from visionfm_core.errors import ConfigError
from visionfm_core.models.heads import TaskModel
from visionfm_core.pretraining import BACKBONE_PREFIX, modality_arrays
from visionfm_core.run_config import RunConfig
from visionfm_core.runtime import resolve_device, seed_everything
from visionfm_core.tasks.data import Preprocess
from visionfm_core.tasks.data_parallel import DistributedFineTuner
from visionfm_core.tasks.samples import TaskSample
from visionfm_core.tasks.splits import TaskSplit
from visionfm_core.tasks.trainer import FineTuner, get_weights

logger = logging.getLogger(__name__)


@dataclass
class FineTuneResult:
    """What a site produced in one fine-tuning round."""

    arrays: dict[str, Tensor]                    # sent: trained encoder and/or shared head, per modality
    metrics: dict[str, float]                    # numbers only
    local_heads: dict[str, dict[str, Tensor]]    # personal heads per modality; stay on the site
    # Per modality, what the site sees of its own training and never sends (under DP: loss, clipping).
    local_stats: dict[str, dict[str, float]] = field(default_factory=dict)


def _reported(task: str, scores: Mapping[str, float], modality: str, prefix: str = "") -> dict[str, float]:
    return {f"{modality}/{prefix}{k}": v for k, v in reported_scores(task, scores).items()}


def _head_of(arrays: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k[len(CLASSIFIER_PREFIX):]: v for k, v in arrays.items() if k.startswith(CLASSIFIER_PREFIX)}


def _encoder_of(arrays: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in arrays.items() if k.startswith(BACKBONE_PREFIX)}


def finetune_round(
    site: Mapping[str, TaskSplit],
    global_arrays: Mapping[str, Tensor],
    cfg: RunConfig,
    server_round: int,
    personal_heads: Mapping[str, Mapping[str, Tensor]],
    site_seed: int = 0,
    budget: PrivacyBudget | None = None,
    ledger: LedgerScope | None = None,
    dist: DistContext | None = None,
) -> FineTuneResult:
    """Fine-tune every modality this site holds task samples for (and the global model has).

    With `cfg.dp`, the head (and the encoder when trained) is trained with DP-SGD (`DPFineTuner`) for
    `finetune-epochs` expected passes over the train split, charged to the site's lifetime ledger before
    it runs; a modality whose budget would be exceeded is not trained and sends nothing. Only privacy
    numbers are reported for it: its loss and validation scores are un-noised and stay on the site.

    `dist`: this process is one worker of a multi-device site (node config `devices`): each worker trains
    on its shard of the train split, `finetune-batch-size` images per device (DDP), and every worker ends
    with the same weights; the caller sends the main worker's result."""
    if dist is not None and cfg.dp:  # per-example accounting across shards is not done
        raise ConfigError("devices", "DP-SGD runs on one device per site: set devices = 1")
    require_ledger(cfg, budget, ledger)
    device = worker_device(cfg.device, dist.rank) if dist is not None else resolve_device(cfg.device)
    arrays: dict[str, Tensor] = {}
    metrics: dict[str, float] = {}
    local_heads: dict[str, dict[str, Tensor]] = {}
    local_stats: dict[str, dict[str, float]] = {}
    for modality, split in site.items():
        shared = modality_arrays(global_arrays, modality)
        train, val = split.train, split.val
        if not _encoder_of(shared) or not train:
            continue
        tuner = new_tuner(cfg, modality, device)
        if dist is not None:
            tuner = DistributedFineTuner.of(tuner, dist)
            metrics[f"{modality}/devices"] = float(dist.world_size)
        tuner.task.check(train + val)
        head = personal_heads.get(modality) if cfg.finetune_head == "personal" else _head_of(shared)
        model = build_task_model(tuner, cfg, shared, head, modality)
        preprocess = task_preprocess(cfg, tuner.task, modality)
        seed = cfg.seed + 1000 * server_round + site_seed
        seed_everything(seed)
        tuner.config.seed = seed  # a different shuffle each round and site
        if cfg.dp and budget is not None and ledger is not None:
            try:
                stats = dp_finetune_round(tuner, model, cfg, server_round, train, val, preprocess, budget, ledger,
                                          modality)
            except PrivacyBudgetExceeded as refused:
                logger.warning("%s", refused)
                metrics[f"{modality}/budget-exhausted"] = 1.0
                continue
            local_stats[modality] = stats
            metrics[f"{modality}/num-examples"] = float(len(train))
            metrics.update({f"{modality}/{k}": v for k, v in releasable_metrics(stats).items()})
        else:
            loader = tuner.loader(train, preprocess, train=True)
            # The task's recipe (lr, layer decay, least steps) unless the run sets it; the server sent it
            # resolved, so this only fills in for a config that never went through the server.
            recipe = resolve_recipe(cfg, tuner.task)
            per_epoch = len(loader)
            steps = round_steps(recipe, per_epoch)
            state = tuner.init_state(model, cfg.finetune_rounds * steps, start_step=(server_round - 1) * steps,
                                     steps_per_epoch=per_epoch)
            stats = train_steps(tuner, state, loader, steps)
            metrics[f"{modality}/num-examples"] = float(len(train))
            metrics[f"{modality}/finetune-loss"] = stats["loss"]
            metrics[f"{modality}/steps"] = stats["steps"]
            if val:
                scores = tuner.evaluate(model, tuner.loader(val, preprocess, train=False))
                metrics.update(_reported(cfg.finetune_task, scores, modality, "val-"))
        if cfg.finetune_encoder == "trained":
            arrays.update({f"{modality}/{BACKBONE_PREFIX}{k}": v
                           for k, v in shareable(get_weights(model, "encoder")).items()})
        head_weights = shareable(get_weights(model, "head"))
        if cfg.finetune_head == "shared":
            arrays.update({f"{modality}/{CLASSIFIER_PREFIX}{k}": v for k, v in head_weights.items()})
        else:
            local_heads[modality] = head_weights
    return FineTuneResult(arrays, metrics, local_heads, local_stats)


def dp_finetune_steps(cfg: RunConfig, dp: DPConfig, train_samples: int) -> int:
    """DP steps of one round: `finetune-epochs` expected passes over the train split."""
    return max(1, round(cfg.finetune_epochs * train_samples / dp.expected_batch_size))


def dp_finetune_round(tuner: FineTuner, model: TaskModel, cfg: RunConfig, server_round: int, train: list[TaskSample],
                 val: list[TaskSample], preprocess: Preprocess, budget: PrivacyBudget, ledger: LedgerScope,
                 modality: str) -> dict[str, float]:
    """One round of DP-SGD fine-tuning of `model`, charged to the ledger before its first step (a fresh
    optimiser each round, as a federated site has); returns the trainer's statistics (site-only)."""
    dp = DPConfig.from_dict(cfg.privacy)
    trainer = DPFineTuner(tuner, dp, SiteAccountant(budget, dp.accountant, f"{modality} data"))
    loader = trainer.loader(train, preprocess, num_workers=cfg.num_workers)
    steps = dp_finetune_steps(cfg, dp, len(train))
    state = tuner.init_state(model, cfg.finetune_rounds * steps, start_step=(server_round - 1) * steps,
                             steps_per_epoch=max(1, steps // max(1, cfg.finetune_epochs)))
    members = image_digests([s.item for s in [*train, *val]], ledger.book.folder)
    trainer.accountant = charge_round(ledger, budget, dp, modality, members, "finetune", server_round,
                                      dp.noise_multiplier, loader, steps)
    return trainer.train_steps(state, loader, steps)


def finetune_evaluate(
    site: Mapping[str, TaskSplit],
    global_arrays: Mapping[str, Tensor],
    cfg: RunConfig,
    personal_heads: Mapping[str, Mapping[str, Tensor]],
) -> dict[str, float]:
    """Scores of the global task model (or the global encoder with this site's personal head) on the
    site's labelled validation split; a modality without a head yet is skipped."""
    device = resolve_device(cfg.device)
    metrics: dict[str, float] = {}
    for modality, split in site.items():
        shared = modality_arrays(global_arrays, modality)
        val = split.val
        head = personal_heads.get(modality) if cfg.finetune_head == "personal" else _head_of(shared)
        if not _encoder_of(shared) or not val or not head:
            continue
        tuner = new_tuner(cfg, modality, device)
        tuner.task.check(val)
        model = build_task_model(tuner, cfg, shared, head, modality)
        preprocess = task_preprocess(cfg, tuner.task, modality)
        # Scored as the saved model predicts (test-time flips where it has them), since the threshold
        # these scores choose travels with that model.
        scores = tuner.evaluate(model, tuner.loader(val, preprocess, train=False), flips=preprocess.test_flips)
        metrics[f"{modality}/num-examples"] = float(len(val))
        metrics.update(_reported(cfg.finetune_task, scores, modality))
    return metrics
