"""Fine-tuning on several devices of one site: DDP over the worker processes `distributed.launch` starts.

`DistributedFineTuner` is the ordinary `FineTuner` with four changes, so every task trains the same way
on one device or N:

- the training data is sharded: every worker draws the permutation the single-process loader would draw
  (same generator, same seed) and takes every N-th index of it, so one step of N workers sees exactly
  the batch one process with an N times larger batch would see;
- the model trains inside `torch.nn.parallel.DistributedDataParallel`, which averages the gradients
  during backward (before gradient clipping and loss-scale unscaling, as on one device), and BatchNorm
  normalises with the statistics of the whole batch of all workers (`nn.SyncBatchNorm` on GPUs; on CPU,
  where torch has no synchronised BatchNorm, `GlobalBatchNorm` below), so running statistics stay the
  same on every worker;
- validation runs on the main worker, which hands its metrics to the others: the best epoch, early
  stopping and the decision threshold are decided once, identically everywhere;
- augmentation draws are seeded with `seed + rank`, so each worker's random crops (tiled segmentation
  included) repeat run after run and differ between workers.

Losses that are not a plain mean over the images (class-weighted cross-entropy, Dice over a batch) are
averaged per shard, as DDP does; they equal the single-process loss only up to that difference.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from visionfm_core.compile import maybe_compile
from visionfm_core.distributed import DistContext
from visionfm_core.errors import DataError
from visionfm_core.models.heads import TaskModel
from visionfm_core.runtime import seed_everything
from visionfm_core.tasks.adapters.base import TaskAdapter
from visionfm_core.tasks.data import Preprocess
from visionfm_core.tasks.samples import TaskSample
from visionfm_core.tasks.trainer import FineTuneConfig, FineTuner, Schedule, TrainState


class ShardSampler(Sampler[int]):
    """This worker's share of another sampler's order: every `world_size`-th index from its rank, the
    order cut to a multiple of `world_size` so every worker gets as many. Iterating the same seeded
    sampler on every worker keeps the shards disjoint, and batch k of the N shards together is batch k
    of one process whose batch is N times larger."""

    def __init__(self, order: Iterable[int], rank: int, world_size: int, length: int) -> None:
        self.order, self.rank, self.world_size, self.length = order, rank, world_size, length

    def __iter__(self) -> Iterator[int]:
        indices = list(self.order)
        usable = len(indices) - len(indices) % self.world_size
        return iter(indices[self.rank:usable:self.world_size])

    def __len__(self) -> int:
        return self.length // self.world_size


class _AllSum(torch.autograd.Function):
    """Sum over the workers with a gradient: the backward pass sums the incoming gradients too."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        summed = tensor.clone()
        dist.all_reduce(summed)
        return summed

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        summed = grad.clone()
        dist.all_reduce(summed)
        return summed


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the whole batch of all workers (CPU and gloo,
    where `nn.SyncBatchNorm` refuses to run). Two-pass mean and variance, as one process computes them,
    and the running statistics updated with the whole batch's unbiased variance."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float()
        local = torch.tensor(float(x.numel() // x.shape[1]), device=x.device)
        count = _AllSum.apply(local)
        mean = _AllSum.apply(x.sum(dim=dims)) / count
        centred = x - mean.view(shape)
        var = _AllSum.apply(centred.pow(2).sum(dim=dims)) / count
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                tracked = self.num_batches_tracked
                if tracked is not None:
                    tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(tracked or 1)
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)
        out = centred / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


def global_batch_norm(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` with every BatchNorm normalising over all workers' batches (same parameters and buffers,
    hence the same state-dict keys: checkpoints and federated updates do not change)."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        replacement = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                      module.track_running_stats)
        replacement.load_state_dict(module.state_dict())
        replacement.train(module.training)
        return replacement.to(device)
    for name, child in module.named_children():
        converted = global_batch_norm(child, device)
        if converted is not child:
            setattr(module, name, converted)
    return module


def _seed_loader_worker(rank: int, worker_id: int) -> None:
    # DataLoader workers are seeded from the shared loader generator (the same on every rank): add the
    # rank so each rank's image-decoding workers draw their own augmentations.
    seed_everything(torch.initial_seed() + 1_000_003 * rank)


class DistributedFineTuner(FineTuner):
    """A `FineTuner` that is one of `ctx.world_size` data-parallel workers (see the module docstring).
    `config.batch_size` is the batch of each worker; a step trains on world_size times as many."""

    def __init__(self, task: TaskAdapter, config: FineTuneConfig, device: torch.device | str,
                 ctx: DistContext) -> None:
        super().__init__(task, config, device)
        self.ctx = ctx

    @classmethod
    def of(cls, tuner: FineTuner, ctx: DistContext) -> DistributedFineTuner:
        """The data-parallel worker form of `tuner` (same task, settings, device and progress)."""
        worker = cls(tuner.task, tuner.config, tuner.device, ctx)
        worker.progress = tuner.progress
        worker.selection_metric = tuner.selection_metric
        return worker

    def plan(self, examples: int) -> Schedule:
        """The whole batch is planned as one process would plan it with a world_size times larger batch,
        then split evenly; steps an epoch are those of each worker's shard."""
        world, max_batch = self.ctx.world_size, self.task.max_batch_size
        whole = Schedule.plan(replace(self.config, batch_size=self.config.batch_size * world), examples,
                              max_batch * world if max_batch else None)
        per_device = max(1, whole.batch_size // world)
        return Schedule.plan(replace(self.config, batch_size=per_device, min_steps_per_epoch=1),
                             max(1, examples // world))

    def loader(self, samples: Sequence[TaskSample], preprocess: Preprocess, train: bool, with_targets: bool = True,
               batch_size: int | None = None, keep_decoded: int | None = None) -> DataLoader[Any]:
        """Training: this worker's shard of the single-process order. Evaluation: every sample (only the
        main worker evaluates)."""
        whole = super().loader(samples, preprocess, train, with_targets, batch_size, keep_decoded)
        if not train:
            return whole
        dataset: Any = whole.dataset
        length = len(dataset)
        if length < self.ctx.world_size:
            raise DataError("<training set>", f"{length} training input(s) cannot be shared by "
                                              f"{self.ctx.world_size} devices: use fewer devices")
        share = length // self.ctx.world_size
        batch = whole.batch_size or 1
        extra: dict[str, Any] = {}
        if whole.num_workers > 0:
            extra = {"persistent_workers": whole.persistent_workers, "prefetch_factor": whole.prefetch_factor,
                     "worker_init_fn": functools.partial(_seed_loader_worker, self.ctx.rank)}
        return DataLoader(
            dataset,
            batch_size=batch,
            # The parent's seeded RandomSampler, drawn from the loader's own generator exactly as one
            # process draws it (the loader takes a seed from that generator first, every epoch).
            sampler=ShardSampler(whole.sampler, self.ctx.rank, self.ctx.world_size, length),
            collate_fn=whole.collate_fn,
            generator=whole.generator,
            num_workers=whole.num_workers,
            pin_memory=whole.pin_memory,
            drop_last=share > batch,
            **extra,
        )

    def init_state(self, model: TaskModel, total_steps: int, start_step: int = 0,
                   steps_per_epoch: int | None = None) -> TrainState:
        """The parent's optimiser state around a DDP copy of `model` (its parameters are `model`'s: the
        caller keeps evaluating and saving `model` itself)."""
        global_batch_norm(model, self.device)
        state = super().init_state(model, total_steps, start_step, steps_per_epoch)
        # DDP copies rank 0's parameters and buffers to every worker here. All parameters a head has are
        # used in every forward pass (checked for every task), so no search for unused ones each step.
        ids = [self.device.index] if self.device.type == "cuda" else None
        state.model = DistributedDataParallel(model, device_ids=ids)  # type: ignore[assignment]
        # The training forward must run through DDP (its hooks average the gradients), compiled or not.
        state.forward = maybe_compile(state.model, self.config.compile, self.device, "the fine-tuning model")
        # Each worker draws its own augmentations, reproducibly (the model is already identical).
        seed_everything(self.config.seed + self.ctx.rank)
        return state

    def train_epochs(self, state: TrainState, loader: DataLoader[Any], epochs: int = 1) -> dict[str, float]:
        """The parent's epochs; the reported loss is the mean over all workers (the whole batch's)."""
        stats = super().train_epochs(state, loader, epochs)
        loss = torch.tensor([stats["loss"]], dtype=torch.float64, device=self._collective_device)
        stats["loss"] = float(self.ctx.mean_(loss))
        return stats

    def evaluate(self, model: TaskModel, loader: DataLoader[Any], flips: bool = False) -> dict[str, float]:
        """The main worker scores the whole validation set and every worker returns its numbers, so all
        of them select the same epoch and threshold."""
        results: list[Any] = [super().evaluate(model, loader, flips) if self.ctx.is_main else None]
        dist.broadcast_object_list(results, src=0, device=self._collective_device)
        scores: dict[str, float] = results[0]
        return scores

    @property
    def _collective_device(self) -> torch.device:
        return self.device if self.ctx.backend == "nccl" else torch.device("cpu")

