"""The site's side of one federated round, without any Flower types.

`train_round` takes the global arrays and the run config and returns the arrays to send back, numbers
to report and the state that must stay on the site; `evaluate_round` scores the global encoders on the
site's own labelled validation data. The Flower handlers in client/app.py only translate records.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from client.privacy.accountant import HISTORY_KEY, PrivacyBudget, PrivacyBudgetExceeded, SiteAccountant
from client.privacy.charging import LedgerScope, charge_round, require_ledger
from client.privacy.dp_ssl import DPSSLTrainer
from client.privacy.entry import dp_ssl_loader, new_dp_trainer
from client.privacy.ledger import image_digests
from client.privacy.reporting import releasable_metrics
from client.privacy.sampling import PoissonLoader
from strategies.protocol.dp_config import DPConfig
from visionfm_core.data.datasets import ImageDataset
from visionfm_core.data.transforms import BatchedMultiCrop, multicrop_transform
from visionfm_core.distributed import DistContext, worker_device
from visionfm_core.errors import ConfigError
from visionfm_core.modalities import get_modality
from visionfm_core.pretraining import evaluate_encoder_arrays, modality_arrays, new_trainer, ssl_config
from visionfm_core.run_config import RunConfig
from visionfm_core.runtime import resolve_device, seed_everything
from visionfm_core.splits import ModalitySplit
from visionfm_core.ssl.trainer import SSLTrainer

logger = logging.getLogger(__name__)


@dataclass
class RoundResult:
    """What a site produced in one training round."""

    arrays: dict[str, torch.Tensor]          # "<modality>/<key>" -> tensor: the only thing that is sent
    metrics: dict[str, float]                # numbers only
    local_state: dict[str, dict[str, torch.Tensor]]  # per modality; stays on the site


def ssl_loader(split: ModalitySplit, cfg: RunConfig, seed: int, dist: DistContext | None = None) -> DataLoader:
    """Shuffled multi-crop batches of a site's training images (a DataLoader: decoding runs in workers); with
    `dist`, this worker's shard, in batches of the same size on every worker."""
    transform = multicrop_transform(get_modality(split.modality), ssl_config(cfg), cfg.image_size, cfg.patch_size)
    generator = torch.Generator().manual_seed(seed)
    items = dist.shard(split.ssl_items) if dist is not None else split.ssl_items
    batch = min(cfg.batch_size, len(split.ssl_items) // (dist.world_size if dist is not None else 1))
    return DataLoader(ImageDataset(items, transform.crop), batch_size=max(batch, 1),
                      shuffle=True, drop_last=True, collate_fn=BatchedMultiCrop(transform), num_workers=cfg.num_workers,
                      generator=generator, persistent_workers=False,
                      # Page-locked batches let the trainer's non_blocking copies overlap the GPU step.
                      pin_memory=resolve_device(cfg.device).type == "cuda")


def train_round(
    site: Mapping[str, ModalitySplit],
    global_arrays: Mapping[str, torch.Tensor],
    cfg: RunConfig,
    server_round: int,
    local_states: Mapping[str, Mapping[str, torch.Tensor]],
    site_seed: int = 0,
    budget: PrivacyBudget | None = None,
    ledger: LedgerScope | None = None,
    dist: DistContext | None = None,
) -> RoundResult:
    """Train every modality this site holds (and the global model has) for `cfg.local_steps` steps.

    With `cfg.dp`, training is DP-SGD within the site's lifetime `budget`, charged to its `ledger` before
    it runs (one dataset per modality). A modality whose budget would be exceeded is not trained and sends
    nothing; only privacy accounting numbers, never un-noised statistics of the images, are reported.

    `dist`: this process is one worker of a multi-device site; it trains on its shard of the images and
    every worker ends with the same weights (see SSLTrainer)."""
    if dist is not None and cfg.dp:
        raise ConfigError("devices", "DP-SGD runs on one device per site: set devices = 1")
    require_ledger(cfg, budget, ledger)
    device = worker_device(cfg.device, dist.rank) if dist is not None else resolve_device(cfg.device)
    arrays: dict[str, torch.Tensor] = {}
    metrics: dict[str, float] = {}
    new_states: dict[str, dict[str, torch.Tensor]] = {}
    for modality, split in site.items():
        shared = modality_arrays(global_arrays, modality)
        if not shared or not split.ssl_items:
            continue
        seed = cfg.seed + 1000 * server_round + site_seed
        seed_everything(seed)
        if cfg.dp and budget is not None:
            dp = DPConfig.from_dict(cfg.privacy)
            accountant = SiteAccountant(budget, mechanism=dp.accountant, label=f"{modality} data")
            trainer: SSLTrainer = new_dp_trainer(cfg, modality, device, dp, accountant, seed_offset=site_seed)
            loader: Iterable[Any] = dp_ssl_loader(split, cfg, dp)
        else:
            trainer = new_trainer(cfg, modality, device, seed_offset=site_seed, dist=dist)
            # Each worker shuffles and augments its own shard with its own seed.
            loader = ssl_loader(split, cfg, seed + (dist.rank if dist is not None else 0), dist)
        if modality in local_states:
            # Under DP the ledger, not the run's state, holds what was spent.
            trainer.load_local_state({k: v for k, v in local_states[modality].items() if k != HISTORY_KEY}
                                     if cfg.dp else local_states[modality])
            trainer.load_shared_state(shared, teacher_sync=cfg.teacher_sync, teacher_ema=cfg.teacher_ema)
        else:
            # First round on this site: the teacher starts as the global student.
            trainer.load_shared_state(shared, teacher_sync="reset")
        try:
            if isinstance(trainer, DPSSLTrainer) and isinstance(loader, PoissonLoader) and budget and ledger:
                members = image_digests([*split.train, *split.val, *split.pretrain], ledger.book.folder)
                trainer.accountant = charge_round(ledger, budget, dp, modality, members, "pretrain", server_round,
                                                  trainer.effective_noise_multiplier(), loader, cfg.local_steps)
            stats = trainer.train_steps(loader, cfg.local_steps, start_step=(server_round - 1) * cfg.local_steps)
        except PrivacyBudgetExceeded as refused:
            logger.warning("%s", refused)
            metrics[f"{modality}/budget-exhausted"] = 1.0
            continue
        if cfg.dp:
            stats = releasable_metrics(stats)
        arrays.update({f"{modality}/{k}": v for k, v in trainer.shared_state().items()})
        new_states[modality] = trainer.local_state()
        metrics[f"{modality}/num-examples"] = float(len(split.ssl_items))
        for name, value in stats.items():
            metrics[f"{modality}/{name}"] = float(value)
        if dist is not None:  # the site's throughput and images: all workers'
            for name in ("images", "images_per_s"):
                if f"{modality}/{name}" in metrics:
                    metrics[f"{modality}/{name}"] *= dist.world_size
            metrics[f"{modality}/devices"] = float(dist.world_size)
    return RoundResult(arrays=arrays, metrics=metrics, local_state=new_states)



def evaluate_round(
    site: Mapping[str, ModalitySplit], global_arrays: Mapping[str, torch.Tensor], cfg: RunConfig
) -> dict[str, float]:
    """Probe scores of each global encoder on this site's labelled validation split."""
    device = resolve_device(cfg.device)
    metrics: dict[str, float] = {}
    for modality, split in site.items():
        shared = modality_arrays(global_arrays, modality)
        labelled_train = [i for i in split.train if i.label is not None]
        labelled_val = [i for i in split.val if i.label is not None]
        if not shared or not labelled_train or not labelled_val:
            continue
        scores = evaluate_encoder_arrays(shared, modality, labelled_train, labelled_val, split.num_classes,
                                         cfg, device)
        for name, value in scores.items():
            metrics[f"{modality}/{name}"] = value
    return metrics
