"""Exponential moving average of weights, one fused multi-tensor op instead of a Python loop per tensor."""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def ema_update_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], momentum: float) -> None:
    """targets <- momentum * targets + (1 - momentum) * sources, in place.

    Used for the teacher (momentum from the cosine schedule) and for the FedEMA-style blend of a local
    teacher with a new global student. Tensors are grouped by device and dtype for the foreach kernel.
    """
    if len(targets) != len(sources):
        raise ValueError(f"ema_update_ got {len(targets)} targets but {len(sources)} sources")
    if not targets:
        return
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for target, source in zip(targets, sources, strict=True):
        if target.shape != source.shape:
            raise ValueError(f"ema_update_ shape mismatch {tuple(target.shape)} vs {tuple(source.shape)}")
        group = groups.setdefault((target.device, target.dtype), ([], []))
        group[0].append(target)
        group[1].append(source.detach().to(device=target.device, dtype=target.dtype))
    for group_targets, group_sources in groups.values():
        # lerp(t, s, w) = t + w * (s - t) = (1 - w) * t + w * s.
        torch._foreach_lerp_(group_targets, group_sources, 1.0 - momentum)
