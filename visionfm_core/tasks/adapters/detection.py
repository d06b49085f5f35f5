"""Bounding-box detection (optic disc, lesions) with a light CenterNet-style head on ViT features.

Each box is a peak on its class's centre heatmap plus a size and a sub-cell offset at that peak.
Loss: CenterNet's penalty-reduced focal loss on the heatmaps, L1 on log-size and offset at the true
centres. Decoding keeps local maxima (3x3), the top ``max_detections`` scores. Metric: mAP@0.5 over
the classes that have ground truth in the split, boxes compared in source-image pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from visionfm_core.errors import ConfigError, DataError
from visionfm_core.evaluation.task_metrics import ImageBoxes, average_precision_per_class, mean_defined
from visionfm_core.models.heads import CenterNetHead, HeadOutput, TaskHead
from visionfm_core.tasks.adapters.base import Meter, Regime, TaskAdapter
from visionfm_core.tasks.data import Batch
from visionfm_core.tasks.geometry import Window
from visionfm_core.tasks.samples import TaskSample

# A box cut by a training crop keeps its label only if this much of it stays in view.
MIN_VISIBLE_FRACTION = 0.4


@dataclass
class DetectionTask(TaskAdapter):
    num_classes: int = 1
    class_names: tuple[str, ...] = ()
    max_detections: int = 20
    score_threshold: float = 0.1

    kind = "detection"
    selection_metric = "map50"
    higher_is_better = True

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ConfigError("num_classes", "detection needs at least one object class")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ConfigError("class_names", f"{len(self.class_names)} names for {self.num_classes} classes")
        self.class_names = tuple(self.class_names) or tuple(f"class{i}" for i in range(self.num_classes))

    def to_config(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "max_detections": self.max_detections,
            "score_threshold": self.score_threshold,
        }

    def build_head(self, embed_dim: int, depth: int, patch_size: int, regime: Regime) -> TaskHead:
        return CenterNetHead(embed_dim, depth, self.num_classes)

    def check(self, samples: Sequence[TaskSample]) -> None:
        for sample in samples:
            if len(sample.boxes) != len(sample.box_labels):
                raise DataError(sample.source, "every box needs a class label")
            for box, label in zip(sample.boxes, sample.box_labels, strict=True):
                if not 0 <= label < self.num_classes:
                    raise DataError(sample.source, f"box label {label} is not a class id 0..{self.num_classes - 1}")
                if not (box[2] > box[0] and box[3] > box[1]):
                    raise DataError(sample.source, f"box {box} is empty (need x0 < x1 and y0 < y1)")

    def prepare(self, sample: TaskSample, window: Window, source_size: tuple[int, int]) -> dict[str, Any]:
        if not sample.boxes:
            return {"boxes": torch.zeros(0, 4), "box_labels": torch.zeros(0, dtype=torch.long)}
        boxes = window.boxes_to_input(np.asarray(sample.boxes, dtype=np.float64))
        clipped = np.clip(boxes, 0, window.size)
        area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
        kept_area = np.prod(np.clip(clipped[:, 2:] - clipped[:, :2], 0, None), axis=1)
        keep = kept_area >= MIN_VISIBLE_FRACTION * area
        labels = np.asarray(sample.box_labels, dtype=np.int64)
        return {
            "boxes": torch.from_numpy(clipped[keep]).float(),
            "box_labels": torch.from_numpy(labels[keep]),
        }

    # --- training -------------------------------------------------------------------------------------

    def _targets(self, boxes: Tensor, labels: Tensor, shape: tuple[int, int], stride: float) -> dict[str, Tensor]:
        height, width = shape
        device = boxes.device
        heat = torch.zeros(self.num_classes, height, width, device=device)
        ys = torch.arange(height, device=device, dtype=torch.float32)[:, None]
        xs = torch.arange(width, device=device, dtype=torch.float32)[None, :]
        cells, sizes, offsets = [], [], []
        for box, label in zip(boxes, labels, strict=True):
            centre = (box[:2] + box[2:]) / 2 / stride
            cell = centre.floor().clamp(
                min=torch.zeros(2, device=device), max=torch.tensor([width - 1, height - 1], device=device)
            )
            extent = ((box[2:] - box[:2]) / stride).clamp_min(1e-3)
            sigma = (extent.min() / 6).clamp_min(0.5)
            gaussian = torch.exp(-((xs - cell[0]) ** 2 + (ys - cell[1]) ** 2) / (2 * sigma**2))
            heat[label] = torch.maximum(heat[label], gaussian)
            cells.append(cell.long())
            sizes.append(extent.log())
            offsets.append(centre - cell)
        stack = lambda v, n: torch.stack(v) if v else torch.zeros(0, n, device=device)  # noqa: E731
        return {
            "heat": heat,
            "cells": stack(cells, 2).long(),
            "sizes": stack(sizes, 2),
            "offsets": stack(offsets, 2),
            "labels": labels,
        }

    def loss(self, outputs: HeadOutput, batch: Batch) -> Tensor:
        assert isinstance(outputs, dict)
        logits, size_map, offset_map = (
            outputs["heatmap"].float(),
            outputs["size"].float(),
            outputs["offset"].float(),
        )
        stride = batch["image"].shape[-1] / logits.shape[-1]
        focal, regression, positives = logits.sum() * 0.0, logits.sum() * 0.0, 0
        for i, (boxes, labels) in enumerate(zip(batch["boxes"], batch["box_labels"], strict=True)):
            target = self._targets(boxes.float(), labels.long(), tuple(logits.shape[-2:]), stride)  # type: ignore[arg-type]
            prob = torch.sigmoid(logits[i]).clamp(1e-4, 1 - 1e-4)
            peak = target["heat"] >= 1.0 - 1e-6
            focal = focal - (torch.log(prob) * (1 - prob) ** 2)[peak].sum()
            focal = focal - (torch.log(1 - prob) * prob**2 * (1 - target["heat"]) ** 4)[~peak].sum()
            cells = target["cells"]
            if len(cells):
                predicted_size = size_map[i][:, cells[:, 1], cells[:, 0]].T
                predicted_offset = offset_map[i][:, cells[:, 1], cells[:, 0]].T
                regression = regression + F.l1_loss(predicted_size, target["sizes"], reduction="sum")
                regression = regression + F.l1_loss(predicted_offset, target["offsets"], reduction="sum")
            positives += len(cells)
        normaliser = max(positives, 1)
        return focal / normaliser + 0.5 * regression / normaliser

    # --- decoding ------------------------------------------------------------------------------------

    def decode(self, outputs: HeadOutput, image_size: int) -> list[ImageBoxes]:
        """Per image, the top-scoring boxes in input pixels."""
        assert isinstance(outputs, dict)
        heat = torch.sigmoid(outputs["heatmap"].float())
        peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
        batch, classes, height, width = heat.shape
        stride = image_size / width
        found: list[ImageBoxes] = []
        for i in range(batch):
            scores, flat = peaks[i].flatten().topk(min(self.max_detections, classes * height * width))
            labels = flat // (height * width)
            cell = flat % (height * width)
            cy, cx = (cell // width).float(), (cell % width).float()
            offset = outputs["offset"][i].float().flatten(1)[:, cell]
            extent = outputs["size"][i].float().flatten(1)[:, cell].clamp(-6, 6).exp() * stride
            centre_x, centre_y = (cx + offset[0]) * stride, (cy + offset[1]) * stride
            boxes = torch.stack(
                [
                    centre_x - extent[0] / 2,
                    centre_y - extent[1] / 2,
                    centre_x + extent[0] / 2,
                    centre_y + extent[1] / 2,
                ],
                dim=1,
            )
            found.append(
                ImageBoxes.of(boxes.detach().cpu().numpy(), labels.cpu().numpy(), scores.detach().cpu().numpy())
            )
        return found

    def source_boxes(self, outputs: HeadOutput, batch: Batch) -> tuple[list[ImageBoxes], list[ImageBoxes]]:
        """Predicted and true boxes of each image in source pixels."""
        predicted = self.decode(outputs, batch["image"].shape[-1])
        pred_source, true_source = [], []
        for index, (pred, values) in enumerate(zip(predicted, batch["window"], strict=True)):
            window = Window.from_tensor(values)
            height, width = batch["source_size"][index].tolist()
            inside = np.clip(window.boxes_to_source(pred.boxes), 0, [width, height, width, height])
            pred_source.append(ImageBoxes(inside, pred.labels, pred.scores))
            if "boxes" in batch:
                true_boxes = window.boxes_to_source(batch["boxes"][index].cpu().numpy())
                true_source.append(ImageBoxes.of(true_boxes, batch["box_labels"][index].cpu().numpy()))
        return pred_source, true_source

    def meter(self) -> Meter:
        return DetectionMeter(self)

    def predictions(self, outputs: HeadOutput, batch: Batch) -> list[dict[str, Any]]:
        predicted, _ = self.source_boxes(outputs, batch)
        results = []
        for image in predicted:
            assert image.scores is not None
            keep = image.scores >= self.score_threshold
            results.append(
                {
                    "boxes": [
                        {
                            "class": self.class_names[int(label)],
                            "score": round(float(score), 4),
                            "box": [round(float(v), 1) for v in box],
                        }
                        for box, label, score in zip(
                            image.boxes[keep], image.labels[keep], image.scores[keep], strict=True
                        )
                    ]
                }
            )
        return results


class DetectionMeter(Meter):
    def __init__(self, task: DetectionTask) -> None:
        self.task = task
        self.predicted: list[ImageBoxes] = []
        self.truth: list[ImageBoxes] = []

    def update(self, outputs: HeadOutput, batch: Batch) -> None:
        predicted, truth = self.task.source_boxes(outputs, batch)
        self.predicted += predicted
        self.truth += truth

    def compute(self) -> dict[str, float]:
        per_class = average_precision_per_class(self.predicted, self.truth, self.task.num_classes, 0.5)
        results = {"map50": mean_defined(per_class), "count": float(len(self.truth))}
        for name, value in zip(self.task.class_names, per_class, strict=True):
            results[f"ap50_{name}"] = value
        return results
