"""DP-SGD fine-tuning: the fine-tuning trainer's model, optimiser groups and schedule, with each sample's
gradient clipped and the sum noised by the same `dp_step` DP pretraining uses.

One sample is one image and its target. The task's loss is evaluated per sample (a batch of one), so
the batch loss it stands for is the mean of per-sample losses; class weights fitted on the site's
labels are un-noised statistics and are refused. BatchNorm layers (VisionFM's probe head) keep their
running statistics frozen (eval mode): their affine weights still train, but batch statistics, which
mix images, never enter a gradient. Targets must be tensors (ragged per-image lists, e.g. detection
boxes, are not supported here).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from client.privacy.accountant import SiteAccountant
from client.privacy.dp_step import NoiseSettings, PerSampleLoss, dp_step
from client.privacy.noise import noise_generator
from client.privacy.sampling import ExactRecordDataset, PoissonLoader
from strategies.protocol.dp_config import DPConfig
from visionfm_core.data.batches import cycle_batches
from visionfm_core.errors import ConfigError
from visionfm_core.runtime import autocast_dtype, torch_threads
from visionfm_core.tasks.data import Batch, Preprocess, TaskDataset, collate
from visionfm_core.tasks.samples import TaskSample
from visionfm_core.tasks.trainer import FineTuner, TrainState, learning_rate


def task_sample_loss(tuner: FineTuner) -> PerSampleLoss:
    """The task's loss on one sample (its tensors without the batch dimension) through the model."""
    task = tuner.task

    def loss(model: nn.Module, sample: dict[str, Tensor]) -> Tensor:
        batch = {k: v.unsqueeze(0) for k, v in sample.items()}
        return task.loss(model(batch["image"]), batch)

    return loss


def per_sample_tensors(batch: Batch, device: torch.device) -> dict[str, Tensor]:
    """The tensor entries of a collated task batch that have one row per sample, on `device`."""
    size = len(batch["image"])
    return {
        k: v.to(device, non_blocking=True)
        for k, v in batch.items()
        if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == size and k not in ("index", "valid")
    }


class DPFineTuner:
    """Wraps a `FineTuner`: build the model and `TrainState` with it, then train with `train_steps`."""

    def __init__(
        self, tuner: FineTuner, dp: DPConfig, accountant: SiteAccountant, noise_seed: int | None = None
    ) -> None:
        weights = getattr(tuner.task, "weights", None)
        if weights:
            raise ConfigError(
                "class_weighting",
                "class weights fitted on the site's labels are not private; "
                "DP fine-tuning needs class_weighting='none'",
            )
        self.tuner = tuner
        self.dp = dp
        self.accountant = accountant
        self.device = tuner.device
        self.noise = noise_generator(self.device, noise_seed, secure=dp.secure_noise)
        dtype = autocast_dtype(self.device) if tuner.config.mixed_precision else None
        # fp16 would need loss scaling inside every per-sample gradient; such devices run in fp32.
        self.autocast = dtype if dtype == torch.bfloat16 else None
        self.loss = task_sample_loss(tuner)
        self.sample_rate: float | None = None

    def loader(
        self,
        samples: Sequence[TaskSample],
        preprocess: Preprocess,
        num_workers: int = 0,
        seed: int | None = None,
    ) -> PoissonLoader[Batch]:
        """Poisson-sampled training batches (augmented); unreadable samples are dropped, never replaced."""
        dataset = TaskDataset(samples, preprocess, self.tuner.task.prepare, train=True)
        return PoissonLoader(
            ExactRecordDataset(dataset),
            self.dp.expected_batch_size,
            collate,
            num_workers=num_workers,
            seed=seed,
        )

    def train_steps(self, state: TrainState, loader: Iterable[Any], num_steps: int) -> dict[str, float]:
        """`num_steps` DP steps; refuses the round (PrivacyBudgetExceeded) before any step if it would
        exceed the budget. Returns loss, steps, lr and the privacy metrics (epsilon, ...)."""
        if not isinstance(loader, PoissonLoader):
            raise ConfigError(
                "loader",
                f"DP-SGD needs Poisson-sampled batches (DPFineTuner.loader), got {type(loader).__name__}",
            )
        if num_steps < 1:
            raise ConfigError("num_steps", f"must be >= 1, got {num_steps}")
        if self.accountant.budget.delta >= 1.0 / loader.dataset_size:
            raise ConfigError(
                "privacy.delta",
                f"{self.accountant.budget.delta:g} is not below "
                f"1/{loader.dataset_size} (one over the number of training samples)",
            )
        sigma, rate = self.dp.noise_multiplier, loader.sample_rate
        self.sample_rate = rate
        self.accountant.check(num_steps, sigma, rate)
        settings = NoiseSettings(self.dp.max_grad_norm, sigma, loader.expected_batch_size)
        model, config = state.model, self.tuner.config
        model.train()
        _freeze_batchnorm_statistics(model)
        batches = cycle_batches(loader, "the Poisson loader")
        loss_sum, counted, images, clipped, lr = 0.0, 0, 0, 0, 0.0
        started = time.perf_counter()
        with torch_threads(config.threads):
            for _ in range(num_steps):
                batch = next(batches)
                lr = learning_rate(
                    state.step, state.total_steps, state.warmup_steps, config.lr, config.min_lr
                )
                for group in state.optimizer.param_groups:
                    group["lr"] = lr * group["lr_scale"]
                samples = None if batch is None else per_sample_tensors(batch, self.device)
                result = dp_step(
                    model,
                    self.loss,
                    samples,
                    settings,
                    self.noise,
                    autocast_dtype=self.autocast,
                    microbatch_size=self.dp.microbatch_size,
                )
                state.optimizer.step()
                state.optimizer.zero_grad(set_to_none=True)
                self.accountant.spend(sigma, rate, 1)
                state.step += 1
                if result.samples > result.nonfinite:
                    loss_sum += result.mean_loss
                    counted += 1
                images += result.samples
                clipped += result.clipped
        elapsed = max(time.perf_counter() - started, 1e-9)
        return {
            "loss": loss_sum / counted if counted else float("nan"),
            "steps": float(num_steps),
            "lr": lr,
            "images": float(images),
            "images_per_s": images / elapsed,
            "clipped_fraction": clipped / images if images else 0.0,
            **self.privacy_metrics(),
        }

    def privacy_metrics(self) -> dict[str, float]:
        return {
            "epsilon": self.accountant.epsilon_spent(),
            "delta": self.accountant.budget.delta,
            "epsilon_budget": self.accountant.budget.epsilon,
            "noise_multiplier": self.dp.noise_multiplier,
            "sample_rate": self.sample_rate if self.sample_rate is not None else float("nan"),
        }


def _freeze_batchnorm_statistics(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
