"""The two non-federated arms a federation is compared against, with the same data and compute:
centralized (every site's images pooled in one place, as many steps as all sites together) and
local-only (each site alone, its own steps). Both write the same metrics rows as a federation, and both
run the fine-tuning phase when `finetune-rounds` > 0 (simulations/baseline_finetune.py); with
`init-encoders` they fine-tune those encoders instead of pretraining, as a federation does."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from client.privacy.accountant import PrivacyBudgetExceeded, SiteAccountant
from client.privacy.charging import charge_round
from client.privacy.dp_ssl import DPSSLTrainer
from client.privacy.entry import dp_ssl_loader, new_dp_trainer
from client.privacy.ledger import image_digests
from client.privacy.reporting import releasable_metrics
from client.training import ssl_loader
from server.federation.checkpoints import save_encoders
from server.federation.finetune_phase import PHASES as FINETUNE_PHASES
from server.federation.finetune_phase import PLOTTED as FINETUNE_PLOTTED
from server.federation.finetune_phase import resolve_finetune_task
from server.federation.report import MetricsLog, plot_metrics, write_report
from simulations.arm_privacy import ArmPrivacy, local_privacy, pooled_privacy
from simulations.baseline_finetune import finetune_alone, pooled_tasks, site_tasks
from strategies.protocol.dp_config import DPConfig
from strategies.protocol.scenario import Scenario, pooled_data, site_data
from strategies.protocol.task_models import HEADLINE
from visionfm_core.pretraining import encoder_spec, evaluate_encoder_arrays, new_trainer
from visionfm_core.run_config import RunConfig
from visionfm_core.runtime import resolve_device, seed_everything
from visionfm_core.splits import ModalitySplit
from visionfm_core.ssl.trainer import SSLTrainer

logger = logging.getLogger(__name__)

Evaluator = Callable[[dict[str, np.ndarray]], dict[str, dict[str, float]]]


def _new_trainer(run_cfg: RunConfig, modality: str, device: torch.device, seed_offset: int,
                 privacy: ArmPrivacy | None) -> SSLTrainer:
    if privacy is None:
        return new_trainer(run_cfg, modality, device, seed_offset)
    dp = DPConfig.from_dict(run_cfg.privacy)
    accountant = SiteAccountant(privacy.budget_for(modality), dp.accountant, f"{modality} data")
    return new_dp_trainer(run_cfg, modality, device, dp, accountant, seed_offset)


def _train_steps(trainer: SSLTrainer, split: ModalitySplit, run_cfg: RunConfig, server_round: int, seed: int,
                 privacy: ArmPrivacy | None) -> dict[str, float]:
    """One round of the arm's training; under DP charged to its ledger first, and only privacy numbers kept."""
    start = (server_round - 1) * run_cfg.local_steps
    if privacy is None or not isinstance(trainer, DPSSLTrainer):
        return trainer.train_steps(ssl_loader(split, run_cfg, seed), run_cfg.local_steps, start_step=start)
    dp = DPConfig.from_dict(run_cfg.privacy)
    loader = dp_ssl_loader(split, run_cfg, dp)
    members = image_digests([*split.train, *split.val, *split.pretrain], privacy.ledger.book.folder)
    budget = privacy.budget_for(split.modality)
    trainer.accountant = charge_round(privacy.ledger, budget, dp, split.modality, members, "pretrain", server_round,
                                      trainer.effective_noise_multiplier(), loader, run_cfg.local_steps)
    return releasable_metrics(trainer.train_steps(loader, run_cfg.local_steps, start_step=start))


def _train_alone(
    label: str, data: dict[str, ModalitySplit], cfg: RunConfig, steps_per_round: dict[str, int],
    log: MetricsLog, central_evaluator: Evaluator | None, seed_offset: int, privacy: ArmPrivacy | None = None,
) -> dict[str, np.ndarray]:
    """Train one trainer per modality continuously, evaluating at the same round marks as a federation.
    Under DP (`privacy`), every round is DP-SGD charged to the arm's ledger, and scores come only from
    the held-out test split, as in the federated arm."""
    device = resolve_device(cfg.device)
    arrays: dict[str, np.ndarray] = {}
    trainers = {}
    for modality in data:
        seed_everything(cfg.seed)
        run_cfg = cfg.replace(local_steps=steps_per_round[modality])
        trainers[modality] = (_new_trainer(run_cfg, modality, device, seed_offset, privacy), run_cfg)
        arrays.update({f"{modality}/{k}": v.numpy() for k, v in trainers[modality][0].shared_state().items()})

    def evaluate(server_round: int) -> None:
        for modality, split in data.items():
            if privacy is not None:
                break
            labelled_train = [i for i in split.train if i.label is not None]
            labelled_val = [i for i in split.val if i.label is not None]
            if labelled_train and labelled_val:
                shared = {k: torch.from_numpy(v) for k, v in arrays.items() if k.startswith(f"{modality}/")}
                scores = evaluate_encoder_arrays({k.split("/", 1)[1]: v for k, v in shared.items()}, modality,
                                                 labelled_train, labelled_val, split.num_classes, cfg, device)
                log.add(server_round, label, modality, "evaluate", scores)
        if central_evaluator is not None:
            for modality, values in central_evaluator(arrays).items():
                if modality in data:
                    log.add(server_round, f"{label}:global-test", modality, "evaluate", values)

    evaluate(0)
    for server_round in range(1, cfg.num_rounds + 1):
        for modality, split in data.items():
            trainer, run_cfg = trainers[modality]
            seed = cfg.seed + 1000 * server_round + seed_offset
            try:
                stats = _train_steps(trainer, split, run_cfg, server_round, seed, privacy)
            except PrivacyBudgetExceeded as refused:
                logger.warning("%s: %s", label, refused)
                log.add(server_round, label, modality, "train", {"budget-exhausted": 1.0})
                continue
            stats["num-examples"] = float(len(split.ssl_items))
            log.add(server_round, label, modality, "train", stats)
            arrays.update({f"{modality}/{k}": v.numpy() for k, v in trainer.shared_state().items()})
        if server_round % cfg.eval_every == 0 or server_round == cfg.num_rounds:
            evaluate(server_round)
        log.save()
    return arrays


def run_centralized(scenario: Scenario, cfg: RunConfig, central_evaluator: Evaluator | None) -> MetricsLog:
    """Pool every site's data per modality; per round, as many steps as all holders of it together."""
    out = Path(cfg.out_dir)
    log = MetricsLog(out)
    log.rows = []
    data = pooled_data(scenario, cfg.val_fraction)
    holders = {m: sum(m in s.modalities for s in scenario.sites) for m in data}
    steps = {m: cfg.local_steps * holders[m] for m in data}
    privacy = pooled_privacy(scenario, cfg, out)
    arrays, rounds_done = _pretrained(cfg) or (
        _train_alone("centralized", data, cfg, steps, log, central_evaluator, seed_offset=0, privacy=privacy),
        cfg.num_rounds)
    if cfg.finetune_rounds > 0:
        finetune_alone("centralized", pooled_tasks(scenario, resolve_finetune_task(cfg)), cfg, arrays, log,
                       round_offset=rounds_done, seed_offset=0, privacy=privacy)
    _finish(out, cfg, log, arrays, "centralized pretraining (all sites' data pooled)")
    return log


def run_local(scenario: Scenario, cfg: RunConfig, central_evaluator: Evaluator | None) -> MetricsLog:
    """Each site trains alone on its own data with its own per-round steps."""
    out = Path(cfg.out_dir)
    log = MetricsLog(out)
    log.rows = []
    for index, site in enumerate(scenario.sites):
        data = site_data(scenario, index, cfg.val_fraction)
        site_cfg = cfg.replace(out_dir=str(out / site.name))
        given = _pretrained(cfg)
        privacy = local_privacy(scenario, cfg, out, index)
        if given is None:
            arrays = _train_alone(site.name, data, site_cfg, {m: cfg.local_steps for m in data}, log,
                                  central_evaluator, seed_offset=index + 1, privacy=privacy)
            save_encoders(out / site.name / "encoders", arrays, list(data), encoder_spec(cfg),
                          round=cfg.num_rounds, objective=cfg.objective)
        arrays, rounds_done = given or (arrays, cfg.num_rounds)
        if cfg.finetune_rounds > 0:
            finetune_alone(site.name, site_tasks(resolve_finetune_task(cfg), index), cfg, arrays, log,
                           round_offset=rounds_done, seed_offset=index + 1, privacy=privacy)
    _finish(out, cfg, log, {}, "local-only pretraining (each site alone)")
    return log


def _pretrained(cfg: RunConfig) -> tuple[dict[str, np.ndarray], int] | None:
    """The `init-encoders` to fine-tune instead of pretraining (0 pretraining rounds), if given."""
    if not cfg.init_encoders:
        return None
    from server.federation.finetune_phase import load_init_encoders

    return load_init_encoders(cfg), 0


def _finish(out: Path, cfg: RunConfig, log: MetricsLog, arrays: dict[str, np.ndarray], title: str) -> None:
    log.save()
    if arrays:
        save_encoders(out / "encoders", arrays, cfg.modality_list, encoder_spec(cfg), round=cfg.num_rounds,
                      objective=cfg.objective)
    plots = plot_metrics(log.rows, out / "plots")
    notes: list[str] = []
    tuned = [r for r in log.rows if r["phase"] in FINETUNE_PHASES]
    if tuned:
        cfg = resolve_finetune_task(cfg)  # the task a bundled finetune-data set stands for
        plots += plot_metrics(tuned, out / "plots", FINETUNE_PLOTTED)
        title += f", then {cfg.finetune_rounds} fine-tuning rounds ({cfg.finetune_task})"
        last = max(int(r["round"]) for r in tuned)
        for row in sorted((r for r in tuned if r["phase"] == "finetune-evaluate" and int(r["round"]) == last),
                          key=lambda r: (r["site"], r["modality"])):
            scores = ", ".join(f"{k} {row[k]:.3f}" for k in HEADLINE[cfg.finetune_task] if k in row)
            notes.append(f"last fine-tune round, {row['site']} {row['modality']}: {scores}")
    write_report(out, f"visionfm-fed {title}", cfg.to_flat(), log.rows, plots, notes)
