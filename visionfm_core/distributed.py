"""Several devices on one site: N worker processes with torch.distributed (NCCL on GPUs, gloo on CPU).

`launch` starts the workers itself (no torchrun needed), hands each a `DistContext`, and returns rank 0's
result. A worker that dies (exception, signal, out of memory) stops the others, and the caller gets one
`WorkerFailedError` that says which worker stopped and how. Training keeps the workers in lock step by
averaging gradients (what DDP does) and any batch statistic (the DINO centres) with all-reduce.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from visionfm_core.errors import ConfigError, VisionFMError

COLLECTIVE_TIMEOUT = timedelta(hours=2)


class WorkerFailedError(VisionFMError):
    """A worker process of a multi-device run stopped; the others were stopped too."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in a multi-device run (its process group is initialised)."""

    rank: int
    world_size: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This worker's share of `items`: every world_size-th one starting at its rank (disjoint shards
        that together cover every item)."""
        return list(items[self.rank::self.world_size])

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average `tensor` over the workers, in place."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.div_(self.world_size)

    def mean_all_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Average many tensors over the workers with one all-reduce (a flat bucket, as DDP does)."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        self.mean_(flat)
        offset = 0
        for tensor in tensors:
            count = tensor.numel()
            tensor.copy_(flat[offset:offset + count].view_as(tensor))
            offset += count

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Make every worker's `tensors` equal to rank 0's."""
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def validate_devices(devices: int, device: str) -> None:
    """`devices` must be >= 1, and on CUDA no more than the GPUs this machine has."""
    if devices < 1:
        raise ConfigError("devices", f"must be >= 1, got {devices}")
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        available = torch.cuda.device_count()
        if devices > available:
            raise ConfigError("devices", f"{devices} requested, this machine has {available} GPU(s)")


def worker_device(device: str, rank: int) -> torch.device:
    """The device of worker `rank`: GPU `rank` on CUDA (one GPU per worker), else the CPU."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", rank)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _worker(rank: int, world_size: int, backend: str, port: int, threads: int,
            fn: Callable[..., Any], args: tuple[Any, ...], result_path: str) -> None:
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    # Loopback rendezvous: the workers of a site never listen on a routable address. The others wait in a
    # collective while rank 0 alone validates a fine-tuning epoch (minutes on a large set): a long timeout.
    # A worker that dies is noticed at once by `launch`, not by this timeout.
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        result = fn(DistContext(rank, world_size, backend), *args)
        dist.barrier()
        if rank == 0:
            Path(result_path).write_bytes(pickle.dumps(result))
    except Exception as exc:
        # What this worker saw, for the one error of the run: a peer whose collective broke because this
        # worker stopped first is a consequence, not the cause (whichever of the two torch reports first).
        text = str(exc)
        consequence = (isinstance(exc, getattr(dist, "DistBackendError", ()))
                       or any(sign in text for sign in ("by peer", "remote worker", "gloo/transport")))
        _error_path(result_path, rank).write_text(
            f"{'consequence' if consequence else 'cause'}\t{_last_line(f'{type(exc).__name__}: {exc}')}"
        )
        raise
    finally:
        dist.destroy_process_group()


def _error_path(result_path: str, rank: int) -> Path:
    return Path(result_path).with_name(f"error-{rank}.txt")


def launch(fn: Callable[..., Any], args: tuple[Any, ...], world_size: int, device: str = "cpu") -> Any:
    """Run `fn(ctx, *args)` in `world_size` new processes and return what rank 0's call returned.

    `fn` and `args` must be picklable (a module-level function). CPU threads are split between the
    workers. Raises WorkerFailedError naming the first worker that stopped and why."""
    backend = "gloo" if worker_device(device, 0).type == "cpu" else "nccl"
    threads = max(1, (os.cpu_count() or 1) // world_size)
    with tempfile.TemporaryDirectory(prefix="vfm-dist-") as scratch:
        result_path = str(Path(scratch) / "result.pkl")
        context = mp.start_processes(_worker, args=(world_size, backend, _free_port(), threads, fn, args,
                                                    result_path),
                                     nprocs=world_size, join=False, start_method="spawn")
        try:
            while not context.join():
                pass
        except ProcessException as exc:
            raise _failure(context.processes, exc, world_size, result_path) from None
        return pickle.loads(Path(result_path).read_bytes())


def _failure(processes: Sequence[Any], exc: ProcessException, world_size: int,
             result_path: str) -> WorkerFailedError:
    """One error for the whole run, about the worker that started it. A worker killed by a signal is the
    cause even when a peer noticed first (its collective failed when the connection closed); torch stops
    the remaining workers with SIGTERM, so that signal never names the cause. Among workers that raised,
    one whose own code failed wins over one whose collective broke because of it."""
    for index, process in enumerate(processes):
        code = process.exitcode
        if code is not None and code < 0 and -code != signal.SIGTERM:
            return WorkerFailedError(f"worker {index} of {world_size} was killed by {_signal_name(-code)}; "
                                     f"the other workers were stopped")
    for index in range(world_size):
        path = _error_path(result_path, index)
        kind, _, error = path.read_text().partition("\t") if path.is_file() else ("", "", "")
        if kind == "cause":
            return WorkerFailedError(f"worker {index} of {world_size} failed: {error}; the other workers were stopped")
    if isinstance(exc, mp.ProcessRaisedException):
        return WorkerFailedError(f"worker {exc.error_index} of {world_size} failed: {_last_line(str(exc))}; "
                                 f"the other workers were stopped")
    how = f"exited with code {getattr(exc, 'exit_code', '?')}"
    if isinstance(exc, mp.ProcessExitedException) and exc.signal_name:
        how = f"was killed by {exc.signal_name}"
    return WorkerFailedError(f"worker {exc.error_index} of {world_size} {how}; the other workers were stopped")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"
