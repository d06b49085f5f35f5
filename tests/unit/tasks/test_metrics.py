"""Classification metrics against hand-computed cases and the edge cases real splits produce."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from visionfm_core.evaluation.metrics import (
    accuracy,
    bootstrap_ci,
    confusion_matrix,
    f1_macro,
    f1_per_class,
    macro_auc,
    macro_auc_ci,
    per_class_auc,
    quadratic_kappa,
)


def test_accuracy_counts_matches() -> None:
    assert accuracy([0, 1, 2, 2, 1], [0, 1, 1, 2, 0]) == pytest.approx(3 / 5)


def test_accuracy_of_empty_input_is_nan() -> None:
    assert math.isnan(accuracy([], []))


def test_accuracy_rejects_length_mismatch() -> None:
    with pytest.raises(ValueError, match="y_pred"):
        accuracy([0, 1], [0])


def test_binary_auc_hand_computed_from_pairs() -> None:
    # Positive/negative pairs ranked correctly: 0.35>0.1, 0.8>0.1, 0.8>0.4 but not 0.35>0.4 -> 3/4.
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    assert macro_auc([0, 0, 1, 1], p1, num_classes=2) == pytest.approx(0.75)
    assert macro_auc([0, 0, 1, 1], np.stack([1 - p1, p1], 1), num_classes=2) == pytest.approx(0.75)


def test_macro_auc_leaves_absent_class_out_of_the_mean() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.3, 0.5, 0.2], [0.4, 0.6, 0.0], [0.1, 0.8, 0.1]])
    y_true = [0, 0, 1, 1]  # class 2 never occurs
    per_class = per_class_auc(y_true, probs, 3)
    assert per_class[0] == pytest.approx(0.75)  # 0.7>0.4, 0.7>0.1, 0.3>0.1, not 0.3>0.4
    assert per_class[1] == pytest.approx(1.0)
    assert math.isnan(per_class[2])
    assert macro_auc(y_true, probs, 3) == pytest.approx(0.875)


def test_macro_auc_with_one_class_present_is_nan_not_an_error() -> None:
    probs = np.full((4, 5), 0.2)
    assert math.isnan(macro_auc([3, 3, 3, 3], probs, 5))
    assert math.isnan(macro_auc([], np.zeros((0, 5)), 5))


def test_macro_auc_never_raises_on_bad_shapes_or_nan_scores() -> None:
    assert math.isnan(macro_auc([0, 1], np.zeros((2, 3)), 5))
    probs = np.array([[np.nan, 0.5], [0.2, np.nan], [0.9, 0.1]])
    assert math.isnan(macro_auc([0, 1, 0], probs, 2))


def test_multilabel_auc_uses_indicator_columns() -> None:
    indicator = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    scores = np.array([[0.9, 0.1], [0.2, 0.7], [0.6, 0.8], [0.3, 0.2]])
    # column 0: positives 0.9, 0.6 vs negatives 0.2, 0.3 -> 1.0; column 1: 0.7, 0.8 vs 0.1, 0.2 -> 1.0
    assert macro_auc(indicator, scores, 2) == pytest.approx(1.0)
    scores[0, 0] = 0.25  # now 0.25 < 0.3: 3 of 4 pairs right in column 0
    assert per_class_auc(indicator, scores, 2)[0] == pytest.approx(0.75)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 6)), min_size=2, max_size=40))
def test_auc_agrees_with_sklearn_including_ties(pairs: list[tuple[int, int]]) -> None:
    labels, scores = (np.array(v) for v in zip(*pairs, strict=True))
    ours = macro_auc(labels, scores / 6.0, 2)
    if len(set(labels.tolist())) < 2:
        assert math.isnan(ours)
    else:
        assert ours == pytest.approx(roc_auc_score(labels, scores))


def test_quadratic_kappa_hand_computed() -> None:
    # O has (0,0),(1,2),(2,2); weighted observed = 1/4; weighted expected = 2/3 + 1/4 + 1/3 = 5/4.
    assert quadratic_kappa([0, 1, 2], [0, 2, 2], 3) == pytest.approx(1 - 0.25 / 1.25)


def test_quadratic_kappa_perfect_and_undefined_cases() -> None:
    assert quadratic_kappa([0, 1, 2, 4], [0, 1, 2, 4], 5) == pytest.approx(1.0)
    assert math.isnan(quadratic_kappa([2, 2, 2], [2, 2, 2], 5))
    assert math.isnan(quadratic_kappa([], [], 5))
    assert math.isnan(quadratic_kappa([0], [0], 1))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=2, max_size=40))
def test_quadratic_kappa_agrees_with_sklearn(pairs: list[tuple[int, int]]) -> None:
    y_true, y_pred = zip(*pairs, strict=True)
    ours = quadratic_kappa(y_true, y_pred, 5)
    if math.isnan(ours):
        assert len(set(y_true) | set(y_pred)) == 1
    else:
        reference = cohen_kappa_score(y_true, y_pred, weights="quadratic", labels=list(range(5)))
        assert ours == pytest.approx(reference, abs=1e-9)


def test_f1_hand_computed_with_missing_and_unpredicted_classes() -> None:
    y_true, y_pred = [0, 0, 1, 1, 2], [0, 1, 1, 1, 0]
    per_class = f1_per_class(y_true, y_pred, 4)
    assert per_class[0] == pytest.approx(2 / 4)  # TP 1, FP 1, FN 1
    assert per_class[1] == pytest.approx(4 / 5)  # TP 2, FP 1, FN 0
    assert per_class[2] == 0.0  # true once, never predicted
    assert math.isnan(per_class[3])  # neither true nor predicted
    assert f1_macro(y_true, y_pred, 4) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert math.isnan(f1_macro([], [], 4))


def test_confusion_matrix_rejects_out_of_range_labels() -> None:
    assert confusion_matrix([0, 1, 1], [1, 1, 0], 2).tolist() == [[0, 1], [1, 1]]
    with pytest.raises(ValueError, match="y_pred"):
        confusion_matrix([0, 1], [0, 7], 2)


def test_bootstrap_ci_brackets_the_estimate_and_is_reproducible() -> None:
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 3, size=120)
    logits = rng.normal(size=(120, 3)) + 1.5 * np.eye(3)[y_true]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    interval = macro_auc_ci(y_true, probs, 3, resamples=200, seed=3)
    assert interval.estimate == pytest.approx(macro_auc(y_true, probs, 3))
    assert interval.low < interval.estimate < interval.high
    assert interval.low > 0.5 and interval.high <= 1.0
    assert macro_auc_ci(y_true, probs, 3, resamples=200, seed=3) == interval
    assert interval.valid_resamples == 200


def test_bootstrap_ci_of_perfect_classifier_is_a_point() -> None:
    y_true = np.array([0, 1] * 10)
    interval = macro_auc_ci(y_true, np.eye(2)[y_true], 2, resamples=100)
    assert (interval.low, interval.high, interval.estimate) == (1.0, 1.0, 1.0)


def test_bootstrap_ci_is_nan_when_metric_is_undefined() -> None:
    interval = macro_auc_ci([1, 1, 1], np.full((3, 2), 0.5), 2, resamples=50)
    assert math.isnan(interval.estimate) and math.isnan(interval.low) and math.isnan(interval.high)
    assert interval.valid_resamples == 0


def test_bootstrap_ci_works_for_any_metric() -> None:
    interval = bootstrap_ci(accuracy, [0, 1, 1, 0, 1, 1, 0, 0], [0, 1, 0, 0, 1, 1, 1, 0], resamples=300)
    assert interval.estimate == pytest.approx(6 / 8)
    assert 0.0 <= interval.low <= 0.75 <= interval.high <= 1.0
