"""Per-step schedules of DINO/iBOT: learning rate, weight decay, teacher momentum and temperatures.

Pure functions of (step, total_steps) so a federated client that trains steps 40..49 of 100 gets
exactly the values a single site would at those steps. Steps past the end hold the final value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from visionfm_core.ssl.config import SSLConfig


def _clamp_step(step: int, total_steps: int) -> int:
    return min(max(int(step), 0), max(int(total_steps), 1) - 1)


def cosine_schedule(step: int, total_steps: int, base: float, final: float, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> float:
    """Linear warm-up from `warmup_start` reaching `base` at step `warmup_steps - 1`, then a half cosine
    from `base` (at `warmup_steps`) to exactly `final` at the last step `total_steps - 1`."""
    step = _clamp_step(step, total_steps)
    warmup_steps = min(max(int(warmup_steps), 0), max(total_steps, 1))
    if step < warmup_steps:
        # (step + 1) so the first step already learns; DINO starts at 0 and wastes it.
        return warmup_start + (base - warmup_start) * (step + 1) / warmup_steps
    span = total_steps - 1 - warmup_steps
    if span <= 0:
        # Nothing left to anneal (a one-step run): train at the base value, as DINO's arrays do.
        return base
    progress = (step - warmup_steps) / span
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))


def warmup_then_constant(step: int, total_steps: int, start: float, end: float, warmup_steps: int) -> float:
    """Linear from `start` (step 0) to `end` at step `warmup_steps`, then `end` (DINO's teacher temp)."""
    step = _clamp_step(step, total_steps)
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


@dataclass(frozen=True)
class StepSchedule:
    """Every scheduled value of one optimisation step."""

    lr: float
    weight_decay: float
    teacher_momentum: float
    teacher_temp: float
    patch_teacher_temp: float
    freeze_last_layer: bool


def schedule_at(cfg: SSLConfig, step: int, total_steps: int) -> StepSchedule:
    """The scheduled values of global step `step` out of `total_steps`."""
    total_steps = max(int(total_steps), 1)
    warmup = round(cfg.warmup_fraction * total_steps)
    temp_warmup = round(cfg.warmup_teacher_temp_fraction * total_steps)
    return StepSchedule(
        lr=cosine_schedule(step, total_steps, cfg.lr, cfg.min_lr, warmup_steps=warmup),
        weight_decay=cosine_schedule(step, total_steps, cfg.weight_decay, cfg.weight_decay_end),
        teacher_momentum=cosine_schedule(step, total_steps, cfg.teacher_momentum, 1.0),
        teacher_temp=warmup_then_constant(step, total_steps, cfg.warmup_teacher_temp, cfg.teacher_temp,
                                          temp_warmup),
        patch_teacher_temp=warmup_then_constant(step, total_steps, cfg.warmup_patch_teacher_temp,
                                                cfg.patch_teacher_temp, temp_warmup),
        freeze_last_layer=step < cfg.freeze_last_layer_fraction * total_steps,
    )
