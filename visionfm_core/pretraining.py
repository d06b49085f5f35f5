"""Pretraining building blocks driven by one RunConfig: the encoder spec, SSL settings, a trainer per
modality, the initial global model, and the frozen-encoder evaluation. Used by the federated client,
the server and the centralized/local baselines alike, so every mode trains and scores the same way."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from visionfm_core.data.items import ImageItem
from visionfm_core.data.transforms import eval_transform
from visionfm_core.distributed import DistContext
from visionfm_core.evaluation.ssl_eval import probe_scores
from visionfm_core.modalities import get_modality
from visionfm_core.models.encoders import EncoderSpec, create_encoder
from visionfm_core.run_config import RunConfig
from visionfm_core.runtime import seed_everything
from visionfm_core.ssl.config import SSLConfig
from visionfm_core.ssl.trainer import SSLTrainer

BACKBONE_PREFIX = "backbone."


def encoder_spec(cfg: RunConfig) -> EncoderSpec:
    """The encoder architecture every site and the server share for this run."""
    return EncoderSpec(arch=cfg.arch, image_size=cfg.image_size, patch_size=cfg.patch_size,
                       drop_path_rate=float(cfg.ssl.get("drop_path_rate", 0.0)))


DENSE = "dense"


def dense_fov_diameter() -> int:
    """The working scale of the dense fundus tasks: the field-of-view width their tiles are cut at."""
    from visionfm_core.tasks.adapters.segmentation import SegmentationTask

    return int(SegmentationTask().preprocess_defaults().get("fov_diameter", 0))


def ssl_config(cfg: RunConfig) -> SSLConfig:
    """The SSL hyperparameters of the run (run-level keys win over `ssl.*` ones). `ssl.fov-diameter =
    "dense"` cuts fundus views at the segmentation task's working scale, whatever its default is."""
    options = {k: v for k, v in cfg.ssl.items() if k != "drop_path_rate"}
    options.update(objective=cfg.objective, batch_size=cfg.batch_size, share_head=cfg.share_head)
    if str(options.get("fov_diameter", "")).strip().lower() == DENSE:
        options["fov_diameter"] = dense_fov_diameter()
    return SSLConfig.from_dict(options)


def new_trainer(cfg: RunConfig, modality: str, device: torch.device, seed_offset: int = 0,
                dist: DistContext | None = None) -> SSLTrainer:
    """An SSL trainer for one modality with the run's architecture and schedules (`dist`: one worker of a
    multi-device site)."""
    return SSLTrainer(encoder_spec(cfg), get_modality(modality), ssl_config(cfg), total_steps=cfg.total_steps,
                      device=device, seed=cfg.seed + seed_offset, dist=dist, compile=cfg.compile)


def initial_global_arrays(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The round-0 global model: one freshly initialised encoder (and head) per modality, same seed."""
    arrays: dict[str, torch.Tensor] = {}
    for modality in cfg.modality_list:
        seed_everything(cfg.seed)
        trainer = new_trainer(cfg, modality, torch.device("cpu"))
        arrays.update({f"{modality}/{k}": v for k, v in trainer.shared_state().items()})
    return arrays


def modality_arrays(arrays: Mapping[str, torch.Tensor], modality: str) -> dict[str, torch.Tensor]:
    """The part of a global-model dict that belongs to one modality, prefix removed."""
    prefix = f"{modality}/"
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def new_encoder(cfg: RunConfig, input_shape: tuple[int, int] | None = None) -> torch.nn.Module:
    """A freshly initialised encoder of the run's architecture, for a square input or `input_shape`."""
    return create_encoder(encoder_spec(cfg), input_shape)


def encoder_from_arrays(arrays: Mapping[str, torch.Tensor], cfg: RunConfig,
                        input_shape: tuple[int, int] | None = None) -> torch.nn.Module:
    """A timm encoder holding the `backbone.*` part of one modality's arrays (strict load). With
    `input_shape` (height, width) it is built for that input, and the arrays' position embedding must
    already be on its patch grid (the fine-tuning phase resamples it once, at the server)."""
    encoder = new_encoder(cfg, input_shape)
    encoder.load_state_dict({k[len(BACKBONE_PREFIX):]: torch.as_tensor(v) for k, v in arrays.items()
                             if k.startswith(BACKBONE_PREFIX)}, strict=True)
    return encoder


def evaluate_encoder_arrays(
    arrays: Mapping[str, torch.Tensor], modality: str, train_items: Sequence[ImageItem],
    eval_items: Sequence[ImageItem], num_classes: int, cfg: RunConfig, device: torch.device,
) -> dict[str, float]:
    """k-NN and linear-probe scores of one modality's encoder: memory/fit on `train_items`, score on
    `eval_items` (both labelled)."""
    encoder = encoder_from_arrays(arrays, cfg).to(device)
    scores = probe_scores(encoder, train_items, eval_items, num_classes,
                          eval_transform(get_modality(modality), cfg.image_size), device, k=cfg.knn_k)
    return scores.as_metrics()
