"""Optional `torch.compile` of the training steps (`compile = auto | on | off`), never at any risk to a round.

Small ViTs on a GPU are bound by kernel launches (issue #16: ~11 ms of GPU work in a 100 ms ViT-S step
at batch 8), which compilation (fused kernels) and CUDA graphs (one launch per graph, inductor's
"reduce-overhead" mode) remove. The trainers wrap the callables of their step with `maybe_compile`:

- `auto` compiles on CUDA only. On CPU it was measured not to pay, so CPU training stays exactly as it
  was: ViT-Ti/8 SSL step (2x64 + 4x32 px, batch 32, fp32, 1 thread, AMD EPYC Zen 3, Dec 2026, in-process
  interleaved A/B, median per round) compiled ran at 0.93-1.05x the eager step's speed in four A/Bs
  (0.995x with the order alternated each round; max-autotune with the CPP,ATEN GEMM backends 0.93x, it
  still picks ATen's matmuls), after 0.5-8 minutes of compilation. 75% of that step is MKL matmuls
  either way; inductor's fused C++ kernels took as long as the eager GELU/LayerNorm/add/copy kernels
  they replace (profiled; docs/bench/cpu_epyc_ssl_step.txt, bench/bench_ssl_step.py --compile on).
  On an Intel Xeon with AVX-512 (no AMX) the same bench gave 0.99x CPU time, 62.3% against 62.0% of
  the fp32 matmul peak (docs/bench/cpu_xeon_ssl_step.txt).
- `on` compiles on every device (CPU needs a C++ compiler for inductor), `off` never does.
- The module itself is never wrapped, so its `state_dict` keys never gain `_orig_mod.` and
  checkpoints, EMA teachers and federated weight exchange see the very same parameters.
- Shapes are static (`dynamic=False`): every crop resolution (multi-crop global and local views, a
  last smaller batch) gets its own graph, as CUDA graphs need anyway.
- A failure to compile (no C++ compiler, an unsupported op, a backend bug) is caught at the call: one
  warning, then that callable runs eagerly for good. The backward graph is compiled together with the
  forward (not lazily at the first backward), so its failures are caught there too.
- Callers pass `refuse=` with a reason where compilation must not be used (DP-SGD's per-sample
  gradients): the step runs eagerly, logged once, even with `on`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch

from visionfm_core.compile_mode import COMPILE_MODES, check_compile_mode

__all__ = ["COMPILE_MODES", "CompiledCall", "check_compile_mode", "compile_wanted", "mark_step_begin",
           "maybe_compile", "uses_cuda_graphs"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def compile_wanted(mode: str, device: torch.device | str) -> bool:
    """Whether `mode` compiles on `device`: `auto` = CUDA only (on CPU it did not pay, see module docstring)."""
    mode = check_compile_mode(mode)
    if mode == "off":
        return False
    return mode == "on" or torch.device(device).type == "cuda"


def uses_cuda_graphs(mode: str, device: torch.device | str) -> bool:
    """Whether compiled steps on `device` also capture CUDA graphs (inductor's "reduce-overhead")."""
    return compile_wanted(mode, device) and torch.device(device).type == "cuda"


def mark_step_begin(mode: str, device: torch.device | str) -> None:
    """Tell CUDA graph trees a new training iteration starts, so the last step's graph outputs may be
    overwritten (without it, a graph replayed before the previous outputs died would raise)."""
    if uses_cuda_graphs(mode, device):
        torch.compiler.cudagraph_mark_step_begin()


class CompiledCall(Generic[T]):
    """Call the compiled function; on its first failure warn once and call the eager one from then on.

    A genuine error of the step (bad input raised by our own code) fails in eager mode too: then the
    eager error is raised and compilation stays on.
    """

    def __init__(self, eager: Callable[..., T], compiled: Callable[..., T], what: str) -> None:
        self.eager = eager
        self.compiled: Callable[..., T] | None = compiled
        self.what = what
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        """True while the compiled function is in use (False after a fallback)."""
        return self.compiled is not None

    def __call__(self, *args: Any, **kwargs: Any) -> T:
        compiled = self.compiled
        if compiled is None:
            return self.eager(*args, **kwargs)
        try:
            # Compile the backward with the forward, so a backend failure surfaces here, not in backward().
            with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
                return compiled(*args, **kwargs)
        except Exception as error:  # any compiler failure must leave the round running
            result = self.eager(*args, **kwargs)  # raises if the step itself is at fault
            with self._lock:
                if self.compiled is not None:
                    self.compiled = None
                    logger.warning("torch.compile failed for %s (%s: %s); running it eagerly instead",
                                   self.what, type(error).__name__, _first_line(error))
            return result


def maybe_compile(fn: Callable[..., T], mode: str, device: torch.device | str, what: str,
                  refuse: str | None = None) -> Callable[..., T]:
    """`fn` compiled per `mode` on `device` (a CompiledCall with eager fallback), or `fn` itself.

    `fn` is a module or a bound method of one; the module is not wrapped or changed. `refuse` is a
    reason this step must stay eager (logged once when compilation was asked for).
    """
    if not compile_wanted(mode, device):
        return fn
    if refuse:
        _log_once(f"torch.compile skipped for {what}: {refuse}")
        return fn
    options: dict[str, Any] = {"dynamic": False}
    if torch.device(device).type == "cuda":
        options["mode"] = "reduce-overhead"  # CUDA graphs: one launch per graph instead of one per kernel
    try:
        compiled = torch.compile(fn, **options)
    except Exception as error:  # e.g. an unsupported Python or platform
        logger.warning("torch.compile is unavailable for %s (%s: %s); running it eagerly",
                       what, type(error).__name__, _first_line(error))
        return fn
    return CompiledCall(fn, compiled, what)


_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else ""
