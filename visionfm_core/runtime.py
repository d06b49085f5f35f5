"""Device and precision helpers shared by every training and evaluation path (CPU and CUDA alike)."""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Iterator

import numpy as np
import torch


def resolve_device(name: str | None = None) -> torch.device:
    """'auto'/None -> CUDA when available else CPU; otherwise the named device ('cpu', 'cuda:1')."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@functools.cache
def cpu_supports_bf16() -> bool:
    """Whether bf16 matmul runs natively here (AMX / avx512_bf16): then bf16 autocast is fast, else slow."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype to use on `device`, or None for plain fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_supports_bf16():
        return torch.bfloat16
    return None


def autocast_for(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """An autocast context for `device` (a no-op where mixed precision would not pay)."""
    dtype = autocast_dtype(device) if enabled else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run repeats exactly on the same machine."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def torch_threads(num: int | None) -> Iterator[None]:
    """Temporarily limit torch's intra-op threads (simulated sites share the host's cores)."""
    if not num:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
