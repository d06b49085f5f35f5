"""An exponential moving average (EMA) of a model's weights during fine-tuning.

A few hundred CPU steps on a handful of photographs leave the last weights noisy: from one
validation to the next the Dice moves by a few thousandths either way. The average of the recent
weights sits nearer the middle of the region the optimiser wanders in and usually scores a little
better (Polyak averaging; the "model EMA" of timm, DINO's teacher). The trainer validates, selects
and saves the averaged weights when ``FineTuneConfig.ema_decay`` > 0; it costs one copy of the
model and one multiply-add per weight per step.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class WeightAverage:
    """``module`` holds the running average of ``source``'s floating-point parameters and buffers
    (integer buffers are copied). After n updates the next one uses ``min(decay, n / (n + 1))``: the
    plain mean of all weights so far until there are ``1 / (1 - decay)`` of them, an exponential
    average over about that many steps after (so the random initial weights fade out, and the decay
    means what it says on a run of a few hundred steps, where TensorFlow's ``(1 + n) / (10 + n)``
    warm-up would cap it near 0.99)."""

    def __init__(self, source: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(source)
        self.module.requires_grad_(False)
        self.module.eval()

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return min(self.decay, self.updates / (self.updates + 1.0))

    @torch.no_grad()
    def update(self, source: nn.Module) -> None:
        """Move the average towards ``source``'s current weights (call after each optimiser step)."""
        weight = 1.0 - self.current_decay()
        averaged: list[Tensor] = []
        current: list[Tensor] = []
        own = self.module.state_dict()
        for name, value in source.state_dict().items():
            target = own[name]
            if target.is_floating_point():
                averaged.append(target)
                current.append(value.detach().to(target.dtype))
            else:
                target.copy_(value)
        if averaged:
            torch._foreach_lerp_(averaged, current, weight)
        self.updates += 1

    def state_dict(self) -> dict[str, Tensor]:
        """Detached CPU copies of the averaged weights (keys as the source model's)."""
        return {k: v.detach().to("cpu").clone() for k, v in self.module.state_dict().items()}
