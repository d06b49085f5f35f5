"""Dense and geometric metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from visionfm_core.evaluation.task_metrics import (
    IGNORE_INDEX,
    ImageBoxes,
    average_precision,
    average_precision_per_class,
    box_iou,
    dice_per_class,
    foreground_dice,
    iou_per_class,
    mae_per_target,
    mean_absolute_error,
    mean_average_precision,
    mean_radial_error,
    overlap_counts,
    success_detection_rate,
)


def test_dice_and_iou_hand_computed_with_ignored_pixels() -> None:
    target = np.array([[1, 1, 0, 0], [1, 0, 0, IGNORE_INDEX]])
    prediction = np.array([[1, 0, 0, 1], [1, 0, 1, 1]])
    counts = overlap_counts(prediction, target, 2)
    # The ignored pixel (predicted 1) is not counted: class 1 has P=4, T=3, |P∩T|=2.
    assert counts.predicted.tolist() == [3, 4] and counts.target.tolist() == [4, 3]
    assert dice_per_class(counts)[1] == pytest.approx(2 * 2 / 7)
    assert iou_per_class(counts)[1] == pytest.approx(2 / 5)
    assert foreground_dice(counts) == pytest.approx(4 / 7)


def test_class_neither_present_nor_predicted_is_nan_and_left_out() -> None:
    counts = overlap_counts(np.array([0, 1, 1]), np.array([0, 1, 0]), 3)
    values = dice_per_class(counts)
    assert math.isnan(values[2])
    assert foreground_dice(counts) == pytest.approx(values[1]) == pytest.approx(2 / 3)


def test_overlap_counts_reject_mismatched_shapes_and_bad_classes() -> None:
    with pytest.raises(ValueError, match="shape"):
        overlap_counts(np.zeros((2, 2)), np.zeros((2, 3)), 2)
    with pytest.raises(ValueError, match="class"):
        overlap_counts(np.full((2, 2), 5), np.zeros((2, 2)), 2)


def test_radial_error_skips_missing_points() -> None:
    predicted = np.array([[[3.0, 4.0]], [[10.0, 10.0]]])
    target = np.array([[[0.0, 0.0]], [[np.nan, np.nan]]])
    assert mean_radial_error(predicted, target) == pytest.approx(5.0)
    assert success_detection_rate(predicted, target, radius=5.0) == 1.0
    assert math.isnan(mean_radial_error(predicted[1:], target[1:]))


def test_box_iou_hand_computed() -> None:
    iou = box_iou([[0, 0, 2, 2]], [[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]])
    assert iou[0].tolist() == pytest.approx([1 / 7, 1.0, 0.0])


def test_average_precision_all_point_interpolation() -> None:
    # Ranked hits: TP, FP, TP over 2 ground truths: recall 0.5, 0.5, 1; precision 1, 0.5, 2/3.
    assert average_precision([0.5, 0.5, 1.0], [1.0, 0.5, 2 / 3]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_map_counts_duplicates_as_false_positives() -> None:
    truth = [ImageBoxes.of([[0, 0, 10, 10]], [0]), ImageBoxes.of([[0, 0, 10, 10]], [0])]
    predictions = [
        ImageBoxes.of([[0, 0, 10, 10], [1, 1, 10, 10]], [0, 0], [0.9, 0.8]),  # second one is a duplicate
        ImageBoxes.of([[20, 20, 30, 30]], [0], [0.7]),  # misses
    ]
    # Ranked: TP (0.9), FP (0.8), FP (0.7); recall reaches 0.5 with precision 1.
    assert average_precision_per_class(predictions, truth, 1)[0] == pytest.approx(0.5)
    perfect = [ImageBoxes.of(t.boxes, t.labels, [1.0]) for t in truth]
    assert mean_average_precision(perfect, truth, 1) == pytest.approx(1.0)


def test_map_leaves_classes_without_ground_truth_out() -> None:
    truth = [ImageBoxes.of([[0, 0, 4, 4]], [0])]
    predictions = [ImageBoxes.of([[0, 0, 4, 4], [5, 5, 9, 9]], [0, 1], [0.9, 0.9])]
    per_class = average_precision_per_class(predictions, truth, 2)
    assert per_class[0] == pytest.approx(1.0) and math.isnan(per_class[1])
    assert mean_average_precision(predictions, truth, 2) == pytest.approx(1.0)


def test_mae_ignores_unknown_targets() -> None:
    predicted = np.array([[1.0, 5.0], [3.0, 0.0]])
    target = np.array([[2.0, np.nan], [1.0, 4.0]])
    assert mae_per_target(predicted, target) == pytest.approx([1.5, 4.0])
    assert mean_absolute_error(predicted, target) == pytest.approx((1 + 2 + 4) / 3)
    assert math.isnan(mean_absolute_error([1.0], [np.nan]))
