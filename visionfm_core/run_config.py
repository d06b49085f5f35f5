"""One typed configuration for a federated (or simulated) run.

Flower passes run config as a flat mapping with kebab-case keys (nested TOML tables are flattened with
dots, so `[ssl] out-dim = 1024` arrives as `ssl.out-dim`). `RunConfig.from_flat` turns that into typed
fields, rejecting unknown keys by name; `to_flat` gives it back for Flower and for the saved copy of
the resolved config that sits beside every run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from visionfm_core.errors import ConfigError
from visionfm_core.modalities import canonical_modality

SSL_PREFIX = "ssl."
STRATEGIES = ("fedavg", "median", "trimmed-mean", "krum", "multi-krum")
CODECS = ("none", "fp16", "bf16", "int8")


@dataclass
class RunConfig:
    """Hyperparameters of a run. Site facts (data path, modalities held) come from node config."""

    num_rounds: int = 3
    local_steps: int = 10
    batch_size: int = 32
    arch: str = "micro"
    image_size: int = 32
    patch_size: int = 4
    modalities: str = "fundus"
    objective: str = "ibot"
    # How a site's local teacher follows the new global student each round (see docs/DESIGN.md):
    # "ema" keeps local knowledge (FedEMA-style), "reset" restarts it from the global model.
    teacher_sync: str = "ema"
    teacher_ema: float = 0.5
    share_head: bool = True
    # Aggregation: "fedavg" (streaming weighted mean), or robust "median", "trimmed-mean", "krum",
    # "multi-krum"; optional bound on each site's update norm (0 = off).
    strategy: str = "fedavg"
    trim_beta: float = 0.1
    byzantine: int = 1
    max_update_norm: float = 0.0
    # Transport codec of site updates: "none" (fp32), "fp16", "bf16", "int8".
    compression: str = "none"
    # SecAgg+: the server only ever sees each modality's sum over at least `secagg-threshold` of its sites.
    secure_aggregation: bool = False
    secagg_threshold: float = 0.6
    secagg_clip_range: float = 0.5
    min_sites: int = 1
    round_timeout: float = 1800.0
    eval_every: int = 1
    knn_k: int = 20
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    client_threads: int = 0
    num_workers: int = 0
    out_dir: str = "runs/latest"
    # Simulation only: the scenario that defines the simulated sites (bundled name or TOML path).
    scenario: str = ""
    # Optional public, labelled data the server evaluates every global encoder on (simulation: bundled).
    server_eval: str = ""
    progress: bool = False
    # Continue a run folder from its last complete round checkpoint instead of starting afresh.
    resume: bool = False
    ssl: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def modality_list(self) -> list[str]:
        """Canonical modality names of the global model, in the configured order."""
        return [canonical_modality(m) for m in self.modalities.split(",") if m.strip()]

    @property
    def total_steps(self) -> int:
        """Local optimisation steps over the whole run: every schedule spans these."""
        return self.num_rounds * self.local_steps

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid key."""
        positive = ("num_rounds", "local_steps", "batch_size", "image_size", "patch_size", "min_sites", "knn_k")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(_kebab(name), f"must be >= 1, got {getattr(self, name)}")
        if self.objective not in ("dino", "ibot"):
            raise ConfigError("objective", f"must be 'dino' or 'ibot', got {self.objective!r}")
        if self.teacher_sync not in ("ema", "reset"):
            raise ConfigError("teacher-sync", f"must be 'ema' or 'reset', got {self.teacher_sync!r}")
        if not 0.0 <= self.teacher_ema < 1.0:
            raise ConfigError("teacher-ema", f"must be in [0, 1), got {self.teacher_ema}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("val-fraction", f"must be in (0, 1), got {self.val_fraction}")
        if self.strategy not in STRATEGIES:
            raise ConfigError("strategy", f"must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.compression not in CODECS:
            raise ConfigError("compression", f"must be one of {', '.join(CODECS)}, got {self.compression!r}")
        if self.secure_aggregation and self.strategy != "fedavg":
            raise ConfigError("strategy", "secure aggregation reveals only sums: it works with 'fedavg' only")
        if self.secure_aggregation and self.compression != "none":
            raise ConfigError("compression", "secure aggregation quantises updates itself: use 'none'")
        if not self.modality_list:
            raise ConfigError("modalities", "names no modality")

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Build from Flower-style flat config; unknown keys are an error that names them."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        ssl: dict[str, Any] = {}
        for key, value in flat.items():
            if key.startswith(SSL_PREFIX):
                ssl[key[len(SSL_PREFIX):].replace("-", "_")] = value
                continue
            name = key.replace("-", "_")
            if name not in names or name == "ssl":
                raise ConfigError(key, "unknown run-config key")
            kwargs[name] = _coerce(key, value, names[name].type)
        kwargs["ssl"] = ssl
        return cls(**kwargs)

    def to_flat(self) -> dict[str, Any]:
        """Flat kebab-case mapping (Flower UserConfig); round-trips through `from_flat`."""
        flat: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "ssl":
                continue
            flat[_kebab(f.name)] = getattr(self, f.name)
        for key, value in self.ssl.items():
            flat[SSL_PREFIX + _kebab(key)] = value
        return flat

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    kind = str(annotation)
    try:
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "str":
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(key, f"expected {kind}, got {value!r}") from exc
    return value
