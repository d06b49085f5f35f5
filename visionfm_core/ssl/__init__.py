"""Self-supervised pretraining: DINO and iBOT losses, EMA teacher, schedules and one SSL trainer."""

from visionfm_core.ssl.config import SSLConfig, resolve_crop_sizes
from visionfm_core.ssl.trainer import SSLTrainer, TrainingDivergedError

__all__ = ["SSLConfig", "SSLTrainer", "TrainingDivergedError", "resolve_crop_sizes"]
