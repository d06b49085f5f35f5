"""Semantic segmentation (binary or multi-class masks) with a UNETR-style head.

Loss: cross-entropy plus soft Dice over the foreground classes, both blind to ignored pixels
(outside the field of view, outside the image, unknown mask colours). Metrics are computed at the
network's input resolution on the letterboxed image (documented, cheap); `predictions` returns masks
at each image's own resolution. Dice and IoU are summed over the whole split per class ("global"),
``dice_per_image`` averages the foreground Dice of each image.
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
from visionfm_core.evaluation.task_metrics import (
    IGNORE_INDEX,
    OverlapCounts,
    dice_per_class,
    foreground_dice,
    foreground_iou,
    mean_defined,
    overlap_counts,
)
from visionfm_core.models.heads import HeadOutput, TaskHead, UNETRHead
from visionfm_core.tasks.adapters.base import Meter, Regime, TaskAdapter
from visionfm_core.tasks.data import Batch
from visionfm_core.tasks.geometry import Window, logits_to_source, resample_labels
from visionfm_core.tasks.samples import MaskEncoding, TaskSample, load_target_mask


@dataclass
class SegmentationTask(TaskAdapter):
    """``num_classes`` includes background (class 0): a binary mask task has 2."""

    num_classes: int = 2
    class_names: tuple[str, ...] = ()
    encoding: MaskEncoding = field(default_factory=MaskEncoding)
    features: int = 16
    dice_weight: float = 1.0

    kind = "segmentation"
    selection_metric = "dice"
    higher_is_better = True

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ConfigError("num_classes", "segmentation needs background plus at least one class")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ConfigError("class_names", f"{len(self.class_names)} names for {self.num_classes} classes")
        self.class_names = tuple(self.class_names) or (
            "background",
            *(f"class{i}" for i in range(1, self.num_classes)),
        )

    def to_config(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "encoding": self.encoding.to_dict(),
            "features": self.features,
            "dice_weight": self.dice_weight,
        }

    @classmethod
    def from_config(cls, raw: dict[str, Any]) -> SegmentationTask:
        values = dict(raw)
        values["encoding"] = MaskEncoding.from_dict(values.get("encoding", {}))
        values["class_names"] = tuple(values.get("class_names", ()))
        return cls(**values)

    def build_head(self, embed_dim: int, depth: int, patch_size: int, regime: Regime) -> TaskHead:
        return UNETRHead(embed_dim, depth, self.num_classes, features=self.features, patch_size=patch_size)

    def check(self, samples: Sequence[TaskSample]) -> None:
        for sample in samples:
            if sample.mask is None:
                raise DataError(sample.source, "segmentation needs a mask for every image, this one has none")

    def prepare(self, sample: TaskSample, window: Window, source_size: tuple[int, int]) -> dict[str, Any]:
        labels = load_target_mask(sample, self.encoding, self.num_classes, source_size)
        return {"mask": resample_labels(labels, window, self.num_classes)}

    def loss(self, outputs: HeadOutput, batch: Batch) -> Tensor:
        assert isinstance(outputs, Tensor)
        logits, target = outputs.float(), batch["mask"].long()
        cross_entropy = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
        if self.dice_weight == 0:
            return cross_entropy
        valid = (target != IGNORE_INDEX).unsqueeze(1).float()
        one_hot = F.one_hot(target.clamp(0, self.num_classes - 1), self.num_classes).permute(0, 3, 1, 2).float()
        probs = torch.softmax(logits, dim=1) * valid
        one_hot = one_hot * valid
        dims = (0, 2, 3)
        intersection = (probs * one_hot).sum(dims)[1:]
        denominator = probs.sum(dims)[1:] + one_hot.sum(dims)[1:]
        soft_dice = (2 * intersection + 1.0) / (denominator + 1.0)
        if bool(torch.isnan(cross_entropy)):  # every pixel ignored in this batch
            cross_entropy = logits.sum() * 0.0
        return cross_entropy + self.dice_weight * (1.0 - soft_dice.mean())

    def meter(self) -> Meter:
        return SegmentationMeter(self)

    def predictions(self, outputs: HeadOutput, batch: Batch) -> list[dict[str, Any]]:
        assert isinstance(outputs, Tensor)
        results: list[dict[str, Any]] = []
        for logits, window_values, size in zip(outputs, batch["window"], batch["source_size"], strict=True):
            height, width = (int(v) for v in size.tolist())
            source_logits = logits_to_source(logits.float(), Window.from_tensor(window_values), height, width)
            # max().indices: argmax over the leading (channel) dim is ten times slower on the CPU.
            mask = source_logits.max(0).indices.to(torch.uint8).cpu().numpy()
            fractions = np.bincount(mask.ravel(), minlength=self.num_classes) / mask.size
            results.append(
                {
                    "mask": mask,
                    "area_fraction": {
                        name: round(float(f), 6) for name, f in zip(self.class_names, fractions, strict=True)
                    },
                }
            )
        return results


class SegmentationMeter(Meter):
    def __init__(self, task: SegmentationTask) -> None:
        self.task = task
        self.counts = OverlapCounts.zeros(task.num_classes)
        self.per_image: list[float] = []

    def update(self, outputs: HeadOutput, batch: Batch) -> None:
        assert isinstance(outputs, Tensor)
        predicted = outputs.max(1).indices.cpu().numpy()
        target = batch["mask"].cpu().numpy()
        for pred, true in zip(predicted, target, strict=True):
            counts = overlap_counts(pred, true, self.task.num_classes)
            self.counts += counts
            self.per_image.append(foreground_dice(counts))

    def compute(self) -> dict[str, float]:
        results = {
            "dice": foreground_dice(self.counts),
            "iou": foreground_iou(self.counts),
            "dice_per_image": mean_defined(self.per_image),
            "count": float(len(self.per_image)),
        }
        for name, value in zip(self.task.class_names[1:], dice_per_class(self.counts)[1:], strict=True):
            results[f"dice_{name}"] = value
        return results
