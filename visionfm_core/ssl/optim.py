"""AdamW with DINO's parameter groups, per-tensor gradient clipping, and optimizer state as flat tensors."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

# timm's ViT `no_weight_decay()` names: position embedding and special tokens are not decayed.
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "dist_token", "mask_token")


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights (any 1-D tensor) and embeddings/tokens get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in _NO_DECAY_NAMES


def build_optimizer(model: nn.Module, device: torch.device) -> torch.optim.AdamW:
    """AdamW over trainable parameters in two groups: [0] decayed, [1] not decayed.

    The fused kernel (one launch for all tensors) is used where this torch has it for the device.
    lr and weight decay are set by the trainer every step from the schedules.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if is_no_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=0.0, fused=device.type in ("cpu", "cuda"))
    except (RuntimeError, ValueError):  # fused unsupported for this device/torch build
        return torch.optim.AdamW(groups, lr=0.0)


@torch.no_grad()
def clip_gradients_(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip each tensor's gradient to L2 norm `max_norm` (DINO clips per tensor, not globally),
    with multi-tensor kernels. Returns the norms before clipping (empty when nothing has a gradient)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack(torch._foreach_norm(grads))
    if max_norm > 0:
        scale = (max_norm / (norms.float() + 1e-6)).clamp(max=1.0)
        # One host sync for a list of Python scalars: the scalar-list overload is a single fused kernel.
        torch._foreach_mul_(grads, scale.tolist())
    return norms


def optimizer_state(optimizer: torch.optim.Optimizer, names: Mapping[nn.Parameter, str],
                    prefix: str = "optim.") -> dict[str, torch.Tensor]:
    """Flat `prefix<param name>.<state key>` -> CPU tensor (AdamW: exp_avg, exp_avg_sq, step)."""
    flat: dict[str, torch.Tensor] = {}
    for param, state in optimizer.state.items():
        name = names.get(param)  # type: ignore[call-overload]
        if name is None:
            continue
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                flat[f"{prefix}{name}.{key}"] = value.detach().to("cpu", copy=True)
            else:
                flat[f"{prefix}{name}.{key}"] = torch.tensor(float(value))
    return flat


def load_optimizer_state(optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter],
                         flat: Mapping[str, torch.Tensor], prefix: str = "optim.") -> int:
    """Restore what `optimizer_state` produced; keys of unknown or reshaped parameters are ignored.
    Returns how many parameters got their state back."""
    per_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        if not key.startswith(prefix):
            continue
        name, _, state_key = key[len(prefix):].rpartition(".")
        per_param.setdefault(name, {})[state_key] = value
    restored = 0
    for name, state in per_param.items():
        param = params.get(name)
        if param is None:
            continue
        moments = [v for k, v in state.items() if k != "step"]
        if any(m.shape != param.shape for m in moments):
            continue
        # Fused/capturable AdamW keeps its step counter on the parameter's device, the others on the CPU.
        on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
        step_device = param.device if on_device else torch.device("cpu")
        optimizer.state[param] = {
            k: (v.to(device=step_device, dtype=torch.float32) if k == "step"
                else v.to(device=param.device, dtype=param.dtype)).clone()
            for k, v in state.items()
        }
        restored += 1
    return restored
