"""Continuous targets (biomarkers): one or more values per image, some possibly unknown (nan).

Targets are standardised with the training split's mean and standard deviation (stored with the
model), the loss is smooth-L1 on the known values, and MAE is reported in the targets' own units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from visionfm_core.errors import ConfigError, DataError
from visionfm_core.evaluation.task_metrics import mae_per_target, mean_defined
from visionfm_core.models.heads import HeadOutput, LinearHead, ProbeHead, TaskHead
from visionfm_core.tasks.adapters.base import Meter, Regime, TaskAdapter
from visionfm_core.tasks.data import Batch
from visionfm_core.tasks.geometry import Window
from visionfm_core.tasks.samples import TaskSample


@dataclass
class RegressionTask(TaskAdapter):
    num_targets: int = 1
    target_names: tuple[str, ...] = ()
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    kind = "regression"
    selection_metric = "mae"
    higher_is_better = False

    def __post_init__(self) -> None:
        if self.num_targets < 1:
            raise ConfigError("num_targets", "regression needs at least one target")
        if self.target_names and len(self.target_names) != self.num_targets:
            raise ConfigError("target_names", f"{len(self.target_names)} names for {self.num_targets} targets")
        self.target_names = tuple(self.target_names) or tuple(f"target{i}" for i in range(self.num_targets))
        self.mean = list(self.mean) or [0.0] * self.num_targets
        self.std = list(self.std) or [1.0] * self.num_targets

    def to_config(self) -> dict[str, Any]:
        return {
            "num_targets": self.num_targets,
            "target_names": list(self.target_names),
            "mean": self.mean,
            "std": self.std,
        }

    def build_head(self, embed_dim: int, depth: int, patch_size: int, regime: Regime) -> TaskHead:
        if regime == "frozen":
            return ProbeHead(embed_dim, depth, self.num_targets)
        return LinearHead(embed_dim, depth, self.num_targets)

    def check(self, samples: Sequence[TaskSample]) -> None:
        for sample in samples:
            if sample.values is None or len(sample.values) != self.num_targets:
                raise DataError(sample.source, f"needs {self.num_targets} target values (nan when unknown)")

    def fit_to_data(self, samples: Sequence[TaskSample]) -> None:
        values = np.array([s.values for s in samples if s.values is not None], dtype=np.float64)
        known = np.isfinite(values)
        means, stds = [], []
        for t in range(self.num_targets):
            column = values[known[:, t], t] if len(values) else np.array([])
            means.append(float(column.mean()) if len(column) else 0.0)
            spread = float(column.std()) if len(column) > 1 else 0.0
            stds.append(spread if spread > 1e-8 else 1.0)
        self.mean, self.std = means, stds

    def prepare(self, sample: TaskSample, window: Window, source_size: tuple[int, int]) -> dict[str, Any]:
        values = sample.values if sample.values is not None else (float("nan"),) * self.num_targets
        return {"values": torch.tensor(values, dtype=torch.float32)}

    def _scale(self, device: torch.device) -> tuple[Tensor, Tensor]:
        return torch.tensor(self.mean, device=device), torch.tensor(self.std, device=device)

    def loss(self, outputs: HeadOutput, batch: Batch) -> Tensor:
        assert isinstance(outputs, Tensor)
        mean, std = self._scale(outputs.device)
        target = (batch["values"].float() - mean) / std
        known = torch.isfinite(target)
        if not bool(known.any()):
            return outputs.sum() * 0.0
        return F.smooth_l1_loss(outputs.float()[known], target[known])

    def values(self, outputs: HeadOutput) -> np.ndarray:
        """Predictions in the targets' own units, (B, T)."""
        assert isinstance(outputs, Tensor)
        mean, std = self._scale(outputs.device)
        result: np.ndarray = (outputs.float() * std + mean).detach().cpu().numpy()
        return result

    def meter(self) -> Meter:
        return RegressionMeter(self)

    def predictions(self, outputs: HeadOutput, batch: Batch) -> list[dict[str, Any]]:
        return [
            {"values": {name: round(float(v), 6) for name, v in zip(self.target_names, row, strict=True)}}
            for row in self.values(outputs)
        ]


class RegressionMeter(Meter):
    def __init__(self, task: RegressionTask) -> None:
        self.task = task
        self.predicted: list[np.ndarray] = []
        self.truth: list[np.ndarray] = []

    def update(self, outputs: HeadOutput, batch: Batch) -> None:
        self.predicted.append(self.task.values(outputs))
        self.truth.append(batch["values"].cpu().numpy())

    def compute(self) -> dict[str, float]:
        if not self.predicted:
            return {"mae": float("nan"), "count": 0.0}
        predicted, truth = np.concatenate(self.predicted), np.concatenate(self.truth)
        per_target = mae_per_target(predicted, truth)
        known = np.isfinite(truth)
        squared = (predicted[known] - truth[known]) ** 2
        results = {
            "mae": mean_defined(per_target),
            "count": float(len(truth)),
            "rmse": float(np.sqrt(squared.mean())) if len(squared) else float("nan"),
        }
        for name, value in zip(self.task.target_names, per_target, strict=True):
            results[f"mae_{name}"] = value
        return results
