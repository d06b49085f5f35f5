"""The site's side of one federated round, without any Flower types.

`train_round` takes the global arrays and the run config and returns the arrays to send back, numbers
to report and the state that must stay on the site; `evaluate_round` scores the global encoders on the
site's own labelled validation data. The Flower handlers in client/app.py only translate records.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from visionfm_core.data.datasets import ImageDataset
from visionfm_core.data.transforms import collate_multicrop, multicrop_transform
from visionfm_core.modalities import get_modality
from visionfm_core.pretraining import evaluate_encoder_arrays, modality_arrays, new_trainer, ssl_config
from visionfm_core.run_config import RunConfig
from visionfm_core.runtime import resolve_device, seed_everything
from visionfm_core.splits import ModalitySplit

logger = logging.getLogger(__name__)







@dataclass
class RoundResult:
    """What a site produced in one training round."""

    arrays: dict[str, torch.Tensor]          # "<modality>/<key>" -> tensor: the only thing that is sent
    metrics: dict[str, float]                # numbers only
    local_state: dict[str, dict[str, torch.Tensor]]  # per modality; stays on the site


def ssl_loader(split: ModalitySplit, cfg: RunConfig, seed: int) -> DataLoader:
    """Shuffled multi-crop batches of a site's training images (a DataLoader: decoding runs in workers)."""
    transform = multicrop_transform(get_modality(split.modality), ssl_config(cfg), cfg.image_size)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(ImageDataset(split.train, transform), batch_size=min(cfg.batch_size, len(split.train)),
                      shuffle=True, drop_last=True, collate_fn=collate_multicrop, num_workers=cfg.num_workers,
                      generator=generator, persistent_workers=False)


def train_round(
    site: Mapping[str, ModalitySplit],
    global_arrays: Mapping[str, torch.Tensor],
    cfg: RunConfig,
    server_round: int,
    local_states: Mapping[str, Mapping[str, torch.Tensor]],
    site_seed: int = 0,
) -> RoundResult:
    """Train every modality this site holds (and the global model has) for `cfg.local_steps` steps."""
    device = resolve_device(cfg.device)
    arrays: dict[str, torch.Tensor] = {}
    metrics: dict[str, float] = {}
    new_states: dict[str, dict[str, torch.Tensor]] = {}
    for modality, split in site.items():
        shared = modality_arrays(global_arrays, modality)
        if not shared or not split.train:
            continue
        seed = cfg.seed + 1000 * server_round + site_seed
        seed_everything(seed)
        trainer = new_trainer(cfg, modality, device, seed_offset=site_seed)
        if modality in local_states:
            trainer.load_local_state(local_states[modality])
            trainer.load_shared_state(shared, teacher_sync=cfg.teacher_sync, teacher_ema=cfg.teacher_ema)
        else:
            # First round on this site: the teacher starts as the global student.
            trainer.load_shared_state(shared, teacher_sync="reset")
        stats = trainer.train_steps(ssl_loader(split, cfg, seed), cfg.local_steps,
                                    start_step=(server_round - 1) * cfg.local_steps)
        arrays.update({f"{modality}/{k}": v for k, v in trainer.shared_state().items()})
        new_states[modality] = trainer.local_state()
        metrics[f"{modality}/num-examples"] = float(len(split.train))
        for name, value in stats.items():
            metrics[f"{modality}/{name}"] = float(value)
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
