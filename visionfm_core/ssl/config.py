"""Hyperparameters of DINO/iBOT self-supervised pretraining, validated by key.

Every schedule is expressed as a fraction of `total_steps` (in federated learning: rounds x local
steps), so the same config works for one site training alone and for a federation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from visionfm_core.config_values import is_unset, parse_bool, parse_float, parse_int
from visionfm_core.errors import ConfigError

OBJECTIVES = ("dino", "ibot")


@dataclass
class SSLConfig:
    """DINO / iBOT settings. Defaults follow VisionFM/iBOT, shrunk where a CPU could not cope (out_dim)."""

    objective: str = "ibot"
    # Prototypes of the projection head (VisionFM: 8192, DINO: 65536); small by default for CPU sites.
    out_dim: int = 1024
    head_hidden_dim: int = 512
    head_bottleneck_dim: int = 128
    head_layers: int = 3
    global_crops: int = 2
    local_crops: int = 4
    # None (or 0 / "auto" in a config file, which has no null) -> derived from the encoder's image size.
    global_crop_size: int | None = None
    local_crop_size: int | None = None
    global_crop_scale: tuple[float, float] = (0.32, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.32)
    # Fundus photographs: 0 = views are random resized crops of the whole field of view (the crop scales
    # above); > 0 = views are cut at the working scale where the field of view is this many pixels wide
    # (what the dense tasks' tiles see), near one another; "dense" in a run config = the segmentation
    # task's working scale.
    fov_diameter: int = 0
    # With fov_diameter > 0: each view is zoomed by a random factor up to this either way.
    view_zoom: float = 1.25
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_fraction: float = 0.1
    # iBOT's patch targets get their own temperature (VisionFM: 0.04 -> 0.07).
    patch_teacher_temp: float = 0.07
    warmup_patch_teacher_temp: float = 0.04
    center_momentum: float = 0.9
    # Absolute learning rate (DINO scales by batch/256; here the site's batch is small and fixed).
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_fraction: float = 0.1
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    teacher_momentum: float = 0.996
    clip_grad: float = 3.0
    freeze_last_layer_fraction: float = 0.05
    mask_prob: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    lambda_cls: float = 1.0
    lambda_patch: float = 1.0
    batch_size: int = 32
    amp: bool = True
    share_head: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid key."""
        if self.objective not in OBJECTIVES:
            raise ConfigError("ssl.objective",
                              f"must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        for name in ("out_dim", "head_hidden_dim", "head_bottleneck_dim", "head_layers", "global_crops",
                     "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"ssl.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.local_crops < 0:
            raise ConfigError("ssl.local_crops", f"must be >= 0, got {self.local_crops}")
        if self.global_crops + self.local_crops < 2:
            raise ConfigError("ssl.local_crops", "DINO needs at least two crops per image (global + local)")
        if self.fov_diameter < 0:
            raise ConfigError("ssl.fov_diameter", f"must be >= 0 (0 = whole field of view), got {self.fov_diameter}")
        if not self.view_zoom >= 1.0:
            raise ConfigError("ssl.view_zoom", f"must be >= 1, got {self.view_zoom}")
        for name in ("global_crop_size", "local_crop_size"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ConfigError(f"ssl.{name}", f"must be >= 1 or unset, got {value}")
        for name in ("global_crop_scale", "local_crop_scale", "mask_ratio"):
            low, high = getattr(self, name)
            if not 0.0 <= low <= high <= 1.0 or (name != "mask_ratio" and low <= 0.0):
                raise ConfigError(f"ssl.{name}", f"must be an ordered pair within (0, 1], got {(low, high)}")
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp", "patch_teacher_temp",
                     "warmup_patch_teacher_temp", "lr"):
            if not float(getattr(self, name)) > 0.0:
                raise ConfigError(f"ssl.{name}", f"must be > 0, got {getattr(self, name)}")
        for name in ("warmup_teacher_temp_fraction", "warmup_fraction", "freeze_last_layer_fraction",
                     "mask_prob", "center_momentum", "teacher_momentum"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ConfigError(f"ssl.{name}", f"must be in [0, 1], got {getattr(self, name)}")
        for name in ("min_lr", "weight_decay", "weight_decay_end", "clip_grad", "lambda_cls", "lambda_patch"):
            if float(getattr(self, name)) < 0.0:
                raise ConfigError(f"ssl.{name}", f"must be >= 0, got {getattr(self, name)}")
        if self.min_lr > self.lr:
            raise ConfigError("ssl.min_lr", f"{self.min_lr} is above lr {self.lr}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SSLConfig:
        """Build from a (possibly Flower-flattened) mapping: kebab or snake keys, pairs as lists or "a,b".

        Unknown keys and values of the wrong type raise ConfigError naming the key.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for raw_key, value in d.items():
            name = str(raw_key).replace("-", "_")
            if name.startswith("ssl."):
                name = name[4:]
            if name not in fields:
                raise ConfigError(f"ssl.{raw_key}", "unknown SSL config key")
            kwargs[name] = _coerce(f"ssl.{name}", value, str(fields[name].type))
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (pairs as lists) that round-trips through `from_dict`."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }

    def replace(self, **changes: Any) -> SSLConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def resolve_crop_sizes(cfg: SSLConfig, image_size: int, patch_size: int = 16) -> tuple[int, int]:
    """(global, local) crop sizes: global defaults to the encoder's image size, local to about 3/7 of
    it rounded to a multiple of the patch size (224 -> 96 as in DINO), never below one patch."""
    global_size = int(cfg.global_crop_size or image_size)
    if cfg.local_crop_size is not None:
        return global_size, int(cfg.local_crop_size)
    local = max(patch_size, round(global_size * 3 / 7 / patch_size) * patch_size)
    return global_size, int(local)


def _coerce(key: str, value: Any, kind: str) -> Any:
    try:
        if kind == "bool":
            return parse_bool(value)
        if kind == "int":
            return parse_int(value)
        if kind == "int | None":
            # 0 also means "not set" for crop sizes.
            if is_unset(value) or (not isinstance(value, bool) and value == 0):
                return None
            return parse_int(value)
        if kind == "float":
            return parse_float(value)
        if kind == "str":
            if not isinstance(value, str):
                raise TypeError(value)
            return value.strip().lower()
        if kind == "tuple[float, float]":
            parts = value.split(",") if isinstance(value, str) else list(value)
            if len(parts) != 2:
                raise ValueError(value)
            return (float(parts[0]), float(parts[1]))
    except (TypeError, ValueError) as exc:
        raise ConfigError(key, f"expected {kind}, got {value!r}") from exc
    return value
