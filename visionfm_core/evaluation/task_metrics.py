"""Metrics for dense and geometric tasks: Dice/IoU, radial error, box IoU and mAP, regression error.

Same conventions as :mod:`visionfm_core.evaluation.metrics`: nothing measurable gives ``nan``, never
an exception; shape mismatches (programming errors) raise ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

NAN = float("nan")
IGNORE_INDEX = 255


# --- segmentation -----------------------------------------------------------------------------------


@dataclass
class OverlapCounts:
    """Per-class pixel counts summed over images: true positives, predicted and true pixels."""

    intersection: NDArray[np.int64]
    predicted: NDArray[np.int64]
    target: NDArray[np.int64]

    @classmethod
    def zeros(cls, num_classes: int) -> OverlapCounts:
        return cls(*(np.zeros(num_classes, dtype=np.int64) for _ in range(3)))

    def __iadd__(self, other: OverlapCounts) -> OverlapCounts:
        self.intersection += other.intersection
        self.predicted += other.predicted
        self.target += other.target
        return self


def overlap_counts(
    prediction: ArrayLike, target: ArrayLike, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> OverlapCounts:
    """Per-class counts of one or many label maps; pixels whose target is ``ignore_index`` are skipped.

    ``ignore_index`` is how a field-of-view mask is honoured: pixels outside it are set to it.
    """
    pred, true = np.asarray(prediction).astype(np.int64), np.asarray(target).astype(np.int64)
    if pred.shape != true.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {true.shape}")
    keep = true != ignore_index
    pred, true = pred[keep], true[keep]
    if len(pred) and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"prediction holds a class outside 0..{num_classes - 1}")
    hits = pred[pred == true]
    return OverlapCounts(
        intersection=np.bincount(hits, minlength=num_classes)[:num_classes].astype(np.int64),
        predicted=np.bincount(pred, minlength=num_classes)[:num_classes].astype(np.int64),
        target=np.bincount(true[true < num_classes], minlength=num_classes)[:num_classes].astype(np.int64),
    )


def dice_per_class(counts: OverlapCounts) -> list[float]:
    """2|P∩T| / (|P|+|T|) per class; ``nan`` for a class neither predicted nor present (0/0)."""
    denominator = counts.predicted + counts.target
    return [NAN if d == 0 else float(2 * i / d) for i, d in zip(counts.intersection, denominator, strict=True)]


def iou_per_class(counts: OverlapCounts) -> list[float]:
    """|P∩T| / |P∪T| per class; ``nan`` for a class neither predicted nor present (0/0)."""
    union = counts.predicted + counts.target - counts.intersection
    return [NAN if u == 0 else float(i / u) for i, u in zip(counts.intersection, union, strict=True)]


def mean_defined(values: Sequence[float]) -> float:
    """Mean of the non-nan values; ``nan`` when there are none."""
    defined = [v for v in values if not np.isnan(v)]
    return float(np.mean(defined)) if defined else NAN


def foreground_dice(counts: OverlapCounts, background: int | None = 0) -> float:
    """Mean Dice over classes other than ``background`` that are predicted or present."""
    values = dice_per_class(counts)
    return mean_defined([v for c, v in enumerate(values) if c != background])


def foreground_iou(counts: OverlapCounts, background: int | None = 0) -> float:
    """Mean IoU over classes other than ``background`` that are predicted or present."""
    values = iou_per_class(counts)
    return mean_defined([v for c, v in enumerate(values) if c != background])


# --- landmarks ----------------------------------------------------------------------------------------


def radial_errors(predicted: ArrayLike, target: ArrayLike) -> NDArray[np.float64]:
    """Euclidean distance per point for ``(..., 2)`` coordinates; ``nan`` where the target is missing."""
    pred, true = np.asarray(predicted, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if pred.shape != true.shape or pred.shape[-1:] != (2,):
        raise ValueError(f"points must share a (..., 2) shape, got {pred.shape} and {true.shape}")
    distances: NDArray[np.float64] = np.sqrt(((pred - true) ** 2).sum(axis=-1))
    return distances


def mean_radial_error(predicted: ArrayLike, target: ArrayLike) -> float:
    """Mean distance over the points whose target is known; ``nan`` if none is."""
    errors = radial_errors(predicted, target)
    return mean_defined(errors.ravel().tolist())


def success_detection_rate(predicted: ArrayLike, target: ArrayLike, radius: float) -> float:
    """Fraction of known points predicted within ``radius`` (same unit as the coordinates)."""
    errors = radial_errors(predicted, target).ravel()
    known = errors[~np.isnan(errors)]
    return float(np.mean(known <= radius)) if len(known) else NAN


# --- detection ----------------------------------------------------------------------------------------


def box_iou(boxes_a: ArrayLike, boxes_b: ArrayLike) -> NDArray[np.float64]:
    """Pairwise IoU of ``(N, 4)`` and ``(M, 4)`` boxes given as ``x0, y0, x1, y1``."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    intersection = np.clip(bottom_right - top_left, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        iou: NDArray[np.float64] = np.where(union > 0, intersection / union, 0.0)
    return iou


@dataclass(frozen=True)
class ImageBoxes:
    """Boxes of one image: ``boxes`` (N, 4) x0,y0,x1,y1; ``labels`` (N,); ``scores`` (N,) for predictions."""

    boxes: NDArray[np.float64]
    labels: NDArray[np.int64]
    scores: NDArray[np.float64] | None = None

    @classmethod
    def of(cls, boxes: ArrayLike, labels: ArrayLike, scores: ArrayLike | None = None) -> ImageBoxes:
        return cls(
            np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
            np.asarray(labels, dtype=np.int64).reshape(-1),
            None if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1),
        )


def average_precision(recall: ArrayLike, precision: ArrayLike) -> float:
    """Area under the precision envelope (all-point interpolation, as in PASCAL VOC 2010+ and COCO)."""
    r = np.concatenate([[0.0], np.asarray(recall, dtype=np.float64), [1.0]])
    p = np.concatenate([[0.0], np.asarray(precision, dtype=np.float64), [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def average_precision_per_class(
    predictions: Sequence[ImageBoxes],
    targets: Sequence[ImageBoxes],
    num_classes: int,
    iou_threshold: float = 0.5,
) -> list[float]:
    """AP per class at one IoU threshold; ``nan`` for a class with no ground-truth box anywhere.

    A prediction is a true positive when it overlaps a not-yet-matched ground-truth box of its class
    by at least ``iou_threshold`` (greedy, highest score first, as in VOC).
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} prediction sets for {len(targets)} images")
    results: list[float] = []
    for cls in range(num_classes):
        ground_truth = [t.boxes[t.labels == cls] for t in targets]
        total = sum(len(g) for g in ground_truth)
        if total == 0:
            results.append(NAN)
            continue
        detections: list[tuple[float, int, NDArray[np.float64]]] = []
        for image, pred in enumerate(predictions):
            chosen = pred.labels == cls
            scores = pred.scores if pred.scores is not None else np.ones(len(pred.labels))
            detections += [(float(s), image, b) for s, b in zip(scores[chosen], pred.boxes[chosen], strict=True)]
        detections.sort(key=lambda d: -d[0])
        matched = [np.zeros(len(g), dtype=bool) for g in ground_truth]
        hits = np.zeros(len(detections))
        for rank, (_, image, box) in enumerate(detections):
            if len(ground_truth[image]) == 0:
                continue
            overlaps = box_iou(box[None], ground_truth[image])[0]
            best = int(np.argmax(overlaps))
            if overlaps[best] >= iou_threshold and not matched[image][best]:
                matched[image][best] = True
                hits[rank] = 1.0
        true_positives = np.cumsum(hits)
        recall = true_positives / total
        precision = true_positives / np.arange(1, len(detections) + 1)
        results.append(average_precision(recall, precision) if len(detections) else 0.0)
    return results


def mean_average_precision(
    predictions: Sequence[ImageBoxes],
    targets: Sequence[ImageBoxes],
    num_classes: int,
    iou_threshold: float = 0.5,
) -> float:
    """mAP at ``iou_threshold`` (0.5 gives mAP@0.5) over the classes that have ground truth."""
    return mean_defined(average_precision_per_class(predictions, targets, num_classes, iou_threshold))


# --- regression ---------------------------------------------------------------------------------------


def mean_absolute_error(predicted: ArrayLike, target: ArrayLike) -> float:
    """MAE over entries whose target is known (finite); ``nan`` if none is."""
    pred, true = np.asarray(predicted, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if pred.shape != true.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {true.shape}")
    known = np.isfinite(true)
    return float(np.mean(np.abs(pred[known] - true[known]))) if known.any() else NAN


def mae_per_target(predicted: ArrayLike, target: ArrayLike) -> list[float]:
    """MAE per column of ``(N, T)`` arrays, over the rows where that target is known."""
    pred, true = np.asarray(predicted, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if pred.ndim != 2 or pred.shape != true.shape:
        raise ValueError(f"expected two (N, T) arrays, got {pred.shape} and {true.shape}")
    return [mean_absolute_error(pred[:, t], true[:, t]) for t in range(pred.shape[1])]
