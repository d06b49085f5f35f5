"""Self-supervised pretraining: DINO and iBOT losses, EMA teacher, schedules and one SSL trainer.

The trainer (torch, timm) is imported when first asked for: the coordinator's commands read SSLConfig's
defaults (visionfm_core.ssl.config) and must not pay for torch to do so."""

from typing import Any

from visionfm_core.ssl.config import SSLConfig, resolve_crop_sizes

__all__ = ["SSLConfig", "SSLTrainer", "TrainingDivergedError", "resolve_crop_sizes"]


def __getattr__(name: str) -> Any:
    if name in ("SSLTrainer", "TrainingDivergedError"):
        from visionfm_core.ssl import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
