"""Entry points for the federated client: a DP trainer and its Poisson loader from the run config,
mirroring `visionfm_core.pretraining.new_trainer` and `client.training.ssl_loader`.

A round with DP then reads (per modality, one accountant per modality: the image sets are disjoint, so
the site's epsilon is the largest of them):

    trainer = new_dp_trainer(cfg, modality, device, dp, accountant, seed_offset=site_seed)
    trainer.load_local_state(...); trainer.load_shared_state(...)
    stats = trainer.train_steps(dp_ssl_loader(split, cfg, dp), cfg.local_steps, start_step)
    report releasable_metrics(stats); keep trainer.local_state() (it holds the accountant's history)
"""

from __future__ import annotations

import torch

from client.privacy.accountant import SiteAccountant
from client.privacy.dp_ssl import DPSSLTrainer
from client.privacy.sampling import PoissonLoader, ssl_poisson_loader
from strategies.protocol.dp_config import DPConfig
from visionfm_core.data.transforms import multicrop_transform
from visionfm_core.modalities import get_modality
from visionfm_core.pretraining import encoder_spec, ssl_config
from visionfm_core.run_config import RunConfig
from visionfm_core.splits import ModalitySplit


def new_dp_trainer(
    cfg: RunConfig,
    modality: str,
    device: torch.device,
    dp: DPConfig,
    accountant: SiteAccountant,
    seed_offset: int = 0,
) -> DPSSLTrainer:
    """A DP-SGD SSL trainer for one modality with the run's architecture and schedules."""
    return DPSSLTrainer(
        encoder_spec(cfg),
        get_modality(modality),
        ssl_config(cfg),
        cfg.total_steps,
        dp,
        accountant,
        device=device,
        seed=cfg.seed + seed_offset,
    )


def dp_ssl_loader(
    split: ModalitySplit, cfg: RunConfig, dp: DPConfig
) -> PoissonLoader[tuple[list[torch.Tensor], torch.Tensor]]:
    """Poisson-sampled multi-crop batches of a site's training images (secret, OS-seeded draws)."""
    transform = multicrop_transform(
        get_modality(split.modality), ssl_config(cfg), cfg.image_size, cfg.patch_size
    )
    return ssl_poisson_loader(split.ssl_items, transform, dp.expected_batch_size, num_workers=cfg.num_workers)
