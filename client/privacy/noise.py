"""Where a site's DP noise comes from: a cryptographically secure generator by default.

`SecureNoise` draws from `strategies.secure_noise.SecureGaussian` (AES-128-CTR keyed from the OS,
Box-Muller; see that module for the floating-point caveat) on the CPU and moves the values to the
parameter's device: ViT-S-sized noise costs about 1.2x `torch.randn` on two CPU threads, a few
percent of a DP step. `TorchNoise` wraps a `torch.Generator` (Mersenne Twister on CPU, Philox on
CUDA): fast on an accelerator, but predictable from its state, so it is opt-in
(`privacy.secure-noise = false`). Neither ever uses the run seed, which the coordinator knows.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from strategies.secure_noise import SecureGaussian, key_from_seed

Shape = Sequence[int] | torch.Size


class NoiseSource(Protocol):
    """Standard normal float32 tensors for DP mechanisms."""

    def gaussian(self, shape: Shape, device: torch.device) -> Tensor:
        """A float32 tensor of independent N(0, 1) values, of `shape`, on `device`."""
        ...


class SecureNoise:
    """Noise from a CSPRNG (the default). `key` fixes the stream: tests only."""

    def __init__(self, key: bytes | None = None) -> None:
        self._source = SecureGaussian(key)

    def gaussian(self, shape: Shape, device: torch.device) -> Tensor:
        values = torch.from_numpy(self._source.standard_normal(tuple(int(s) for s in shape)))
        return values.to(device)


class TorchNoise:
    """Noise from a torch generator living on the device it draws for."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def gaussian(self, shape: Shape, device: torch.device) -> Tensor:
        return torch.randn(tuple(shape), generator=self.generator, device=device, dtype=torch.float32)


def noise_generator(device: torch.device | str, seed: int | None = None, secure: bool = True) -> NoiseSource:
    """The DP noise source for a trainer on `device`: seeded from the OS unless a seed is given (tests only)."""
    if secure:
        return SecureNoise(None if seed is None else key_from_seed(seed))
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(secrets.randbits(63) if seed is None else int(seed))
    return TorchNoise(generator)


def as_noise_source(noise: NoiseSource | torch.Generator) -> NoiseSource:
    """Accept a bare torch.Generator where a noise source is expected (it is wrapped, not copied)."""
    return TorchNoise(noise) if isinstance(noise, torch.Generator) else noise
