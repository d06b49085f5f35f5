"""DP-SGD settings of a site, validated by key (flat `privacy.*` run-config keys are accepted)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from visionfm_core.config_values import is_unset, parse_bool, parse_float, parse_int
from visionfm_core.errors import ConfigError

Mechanism = Literal["rdp", "prv"]
MECHANISMS: tuple[str, ...] = ("rdp", "prv")

CenterMode = Literal["noised", "fixed"]
CENTER_MODES: tuple[str, ...] = ("noised", "fixed")


@dataclass(frozen=True)
class DPConfig:
    """Sample-level DP-SGD: one image (all its crops) is the privacy unit.

    noise_multiplier: Gaussian noise std / max_grad_norm on the summed clipped gradients.
    max_grad_norm: each image's gradient (all parameters together) is clipped to this L2 norm.
    expected_batch_size: images per step on average; the Poisson sample rate is this / dataset size.
    center: how DINO/iBOT centres are updated. "noised": from each step's batch, every image's teacher
      output clipped to `center_clip` and Gaussian noise of `center_noise_multiplier * center_clip`
      added (the accountant charges gradient and centres as one mechanism); "fixed": never updated from
      private data (it stays at its loaded value, e.g. zero or a centre from public data).
    center_clip: None picks 2 * sqrt(out_dim / bottleneck_dim), about twice the typical norm of a
      teacher output (cosines to unit prototypes), so clipping rarely bites.
    microbatch_size: images whose per-sample gradients are held in memory at once (None: the whole
      batch); lowers peak memory for large encoders, same result.
    accountant: "rdp" (Opacus' RDP accountant) or "prv" (tighter, slower).
    secure_noise: draw the noise from a CSPRNG (AES-CTR keyed from the OS; see
      `client.privacy.noise`); false uses torch's generator, faster on an accelerator but predictable.
    """

    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    expected_batch_size: int = 32
    center: CenterMode = "noised"
    center_noise_multiplier: float = 2.0
    center_clip: float | None = None
    microbatch_size: int | None = None
    accountant: Mechanism = "rdp"
    secure_noise: bool = True

    def __post_init__(self) -> None:
        if not self.noise_multiplier >= 0.0:
            raise ConfigError("privacy.noise-multiplier", f"must be >= 0, got {self.noise_multiplier}")
        if not self.max_grad_norm > 0.0:
            raise ConfigError("privacy.max-grad-norm", f"must be > 0, got {self.max_grad_norm}")
        if self.expected_batch_size < 1:
            raise ConfigError("privacy.expected-batch-size", f"must be >= 1, got {self.expected_batch_size}")
        if self.center not in CENTER_MODES:
            raise ConfigError(
                "privacy.center", f"must be one of {', '.join(CENTER_MODES)}, got {self.center!r}"
            )
        if not self.center_noise_multiplier > 0.0:
            raise ConfigError(
                "privacy.center-noise-multiplier", f"must be > 0, got {self.center_noise_multiplier}"
            )
        if self.center_clip is not None and not self.center_clip > 0.0:
            raise ConfigError("privacy.center-clip", f"must be > 0, got {self.center_clip}")
        if self.microbatch_size is not None and self.microbatch_size < 1:
            raise ConfigError("privacy.microbatch-size", f"must be >= 1 or unset, got {self.microbatch_size}")
        if self.accountant not in MECHANISMS:
            raise ConfigError(
                "privacy.accountant", f"must be one of {', '.join(MECHANISMS)}, got {self.accountant!r}"
            )

    @classmethod
    def from_dict(cls, flat: Mapping[str, Any]) -> DPConfig:
        """From kebab or snake keys, with or without a `privacy.` prefix; unknown keys raise ConfigError."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for raw_key, value in flat.items():
            name = str(raw_key).removeprefix("privacy.").replace("-", "_")
            if name not in fields:
                raise ConfigError(f"privacy.{raw_key}", "unknown DP setting")
            kwargs[name] = _coerce(name, value, str(fields[name].type))
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(name: str, value: Any, kind: str) -> Any:
    key = f"privacy.{name.replace('_', '-')}"
    try:
        if kind.endswith(" | None") and is_unset(value):
            return None
        if kind in ("float", "float | None"):
            return parse_float(value)
        if kind in ("int", "int | None"):
            return parse_int(value)
        if kind == "bool":
            return parse_bool(value)
        return str(value).strip().lower()
    except (TypeError, ValueError) as exc:
        raise ConfigError(key, f"expected {kind}, got {value!r}") from exc
