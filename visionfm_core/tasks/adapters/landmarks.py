"""Landmark localisation (fovea, optic-disc centre, scleral spur...) by heatmap regression.

The head predicts one heatmap per point; a spatial soft-argmax turns it into coordinates. The loss
is the cross-entropy between the predicted heatmap (as a distribution) and a Gaussian around the
true point, plus the L1 distance of the soft-argmax coordinate (in units of the input size), so the
heatmap is both peaked and in the right place. Missing points (nan) and points pushed out of view
by augmentation carry no loss. Mean radial error (``mre``) is reported in source-image pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from visionfm_core.errors import ConfigError, DataError
from visionfm_core.evaluation.task_metrics import mean_defined, radial_errors
from visionfm_core.models.heads import HeadOutput, HeatmapHead, TaskHead
from visionfm_core.tasks.adapters.base import Meter, Regime, TaskAdapter
from visionfm_core.tasks.data import Batch
from visionfm_core.tasks.geometry import Window
from visionfm_core.tasks.samples import TaskSample


def cell_centres(length: int, stride: float, device: torch.device) -> Tensor:
    return (torch.arange(length, device=device, dtype=torch.float32) + 0.5) * stride


def soft_argmax(heatmaps: Tensor, image_size: int) -> tuple[Tensor, Tensor]:
    """(B, K, h, w) logits -> ((B, K, 2) expected x, y in input pixels, (B, K, h*w) probabilities).

    ``image_size`` is the input's width; a cell is as tall as it is wide (non-square inputs too)."""
    height, width = heatmaps.shape[-2:]
    probs = torch.softmax(heatmaps.float().flatten(2), dim=2)
    stride = image_size / width
    xs = cell_centres(width, stride, heatmaps.device).repeat(height)
    ys = cell_centres(height, stride, heatmaps.device).repeat_interleave(width)
    coords = torch.stack([(probs * xs).sum(2), (probs * ys).sum(2)], dim=2)
    return coords, probs


@dataclass
class LandmarkTask(TaskAdapter):
    """``num_points`` named points; ``sigma`` is the target Gaussian's width in heatmap cells."""

    num_points: int = 1
    point_names: tuple[str, ...] = ()
    sigma: float = 1.5
    coordinate_weight: float = 10.0

    kind = "landmarks"
    selection_metric = "mre"
    higher_is_better = False

    def __post_init__(self) -> None:
        if self.num_points < 1:
            raise ConfigError("num_points", "landmark tasks need at least one point")
        if self.point_names and len(self.point_names) != self.num_points:
            raise ConfigError("point_names", f"{len(self.point_names)} names for {self.num_points} points")
        self.point_names = tuple(self.point_names) or tuple(f"point{i}" for i in range(self.num_points))

    def to_config(self) -> dict[str, Any]:
        return {
            "num_points": self.num_points,
            "point_names": list(self.point_names),
            "sigma": self.sigma,
            "coordinate_weight": self.coordinate_weight,
        }

    def build_head(self, embed_dim: int, depth: int, patch_size: int, regime: Regime) -> TaskHead:
        return HeatmapHead(embed_dim, depth, self.num_points)

    def check(self, samples: Sequence[TaskSample]) -> None:
        for sample in samples:
            if sample.points is None or len(sample.points) != self.num_points:
                raise DataError(sample.source, f"needs {self.num_points} points (x, y; nan when missing)")

    def prepare(self, sample: TaskSample, window: Window, source_size: tuple[int, int]) -> dict[str, Any]:
        points = np.full((self.num_points, 2), np.nan)
        if sample.points is not None:
            points = window.to_input(np.asarray(sample.points, dtype=np.float64).reshape(-1, 2))
        return {"points": torch.from_numpy(points).float()}

    def loss(self, outputs: HeadOutput, batch: Batch) -> Tensor:
        assert isinstance(outputs, Tensor)
        heatmaps = outputs.float()
        rows, size = batch["image"].shape[-2:]
        target = batch["points"].float()
        limits = torch.tensor([size, rows], device=target.device)
        inside = torch.isfinite(target).all(-1) & (target >= 0).all(-1) & (target < limits).all(-1)
        if not bool(inside.any()):
            return heatmaps.sum() * 0.0
        coords, probs = soft_argmax(heatmaps, size)
        height, width = heatmaps.shape[-2:]
        stride_x = stride_y = size / width
        xs = cell_centres(width, stride_x, heatmaps.device).repeat(height)
        ys = cell_centres(height, stride_y, heatmaps.device).repeat_interleave(width)
        safe = torch.where(inside[..., None], target, torch.zeros_like(target))
        distance = ((xs - safe[..., :1]) / stride_x) ** 2 + ((ys - safe[..., 1:]) / stride_y) ** 2
        gaussian = torch.exp(-distance / (2 * self.sigma**2))
        gaussian = gaussian / gaussian.sum(-1, keepdim=True).clamp_min(1e-12)
        heat_loss = -(gaussian * torch.log(probs.clamp_min(1e-12))).sum(-1)
        coord_loss = (coords - safe).abs().sum(-1) / size
        per_point = heat_loss + self.coordinate_weight * coord_loss
        return per_point[inside].mean()

    def source_points(self, outputs: HeadOutput, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """Predicted and true points in source pixels, (B, K, 2) each."""
        assert isinstance(outputs, Tensor)
        coords, _ = soft_argmax(outputs, batch["image"].shape[-1])
        predicted, truth = coords.detach().cpu().numpy(), batch["points"].cpu().numpy()
        pred_source, true_source = (
            np.empty_like(predicted, dtype=np.float64),
            np.empty_like(truth, dtype=np.float64),
        )
        for i, values in enumerate(batch["window"]):
            window = Window.from_tensor(values)
            pred_source[i], true_source[i] = window.to_source(predicted[i]), window.to_source(truth[i])
        return pred_source, true_source

    def meter(self) -> Meter:
        return LandmarkMeter(self)

    def predictions(self, outputs: HeadOutput, batch: Batch) -> list[dict[str, Any]]:
        predicted, _ = self.source_points(outputs, batch)
        return [
            {
                "points": {
                    name: [round(float(x), 2), round(float(y), 2)]
                    for name, (x, y) in zip(self.point_names, image, strict=True)
                }
            }
            for image in predicted
        ]


class LandmarkMeter(Meter):
    def __init__(self, task: LandmarkTask) -> None:
        self.task = task
        self.errors: list[np.ndarray] = []

    def update(self, outputs: HeadOutput, batch: Batch) -> None:
        predicted, truth = self.task.source_points(outputs, batch)
        self.errors.append(radial_errors(predicted, truth))

    def compute(self) -> dict[str, float]:
        if not self.errors:
            return {"mre": float("nan"), "count": 0.0}
        errors = np.concatenate(self.errors)
        results = {"mre": mean_defined(errors.ravel().tolist()), "count": float(len(errors))}
        for k, name in enumerate(self.task.point_names):
            results[f"mre_{name}"] = mean_defined(errors[:, k].tolist())
        return results
