"""Which mixed precision an SSL step uses on a device: bf16 where the hardware runs it natively
(CPU with AMX/avx512_bf16, recent CUDA GPUs), fp16 with loss scaling on older GPUs, else fp32."""

from __future__ import annotations

import contextlib
import functools

import torch

from visionfm_core.runtime import autocast_dtype


@functools.cache
def _bf16_matmul_works(device_type: str) -> bool:
    """A tiny bf16 matmul under autocast: the CPU flag alone does not prove this torch build can use it."""
    try:
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            a = torch.ones(4, 4, device=device_type)
            out = a @ a
        return out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all()) and float(out[0, 0]) == 4.0
    except (RuntimeError, TypeError):
        return False


def ssl_autocast_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """The autocast dtype for `device`, or None for plain fp32."""
    if not enabled:
        return None
    dtype = autocast_dtype(device)
    if dtype == torch.bfloat16 and not _bf16_matmul_works(device.type):
        return torch.float16 if device.type == "cuda" else None
    return dtype


def autocast_context(device: torch.device,
                     dtype: torch.dtype | None) -> contextlib.AbstractContextManager[None]:
    """torch.autocast for `dtype`, or a no-op for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 (its small range underflows gradients); bf16 and fp32 need none."""
    if dtype != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)
