"""Classification metrics that give a defined result on real data instead of crashing.

Conventions shared by every function here:

- Labels are integer class indices ``0..num_classes-1``; probabilities are ``(N, C)`` rows.
- An empty input gives ``nan`` (there is nothing to measure), never an exception.
- A metric that is undefined for the data at hand (AUC with one class present, kappa when both
  raters always say the same class) returns ``nan``; callers report it as "n/a".
- A shape mismatch between ``y_true`` and predictions is a programming error and raises ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import rankdata

NAN = float("nan")


def _labels(values: ArrayLike, name: str) -> NDArray[np.int64]:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class indices, got shape {array.shape}")
    return array.astype(np.int64, copy=False)


def _same_length(y_true: NDArray[np.int64], other: NDArray[np.generic], name: str) -> None:
    if len(y_true) != len(other):
        raise ValueError(f"y_true has {len(y_true)} entries but {name} has {len(other)}")


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Fraction of predictions equal to the label; ``nan`` for an empty input."""
    truth, pred = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    _same_length(truth, pred, "y_pred")
    if len(truth) == 0:
        return NAN
    return float(np.mean(truth == pred))


def _as_probability_matrix(probs: ArrayLike, num_classes: int) -> NDArray[np.float64]:
    scores = np.asarray(probs, dtype=np.float64)
    if scores.ndim == 1 and num_classes == 2:
        # A binary model often returns only P(class 1).
        scores = np.stack([1.0 - scores, scores], axis=1)
    if scores.ndim != 2 or scores.shape[1] != num_classes:
        raise ValueError(f"probs must have shape (N, {num_classes}), got {scores.shape}")
    return scores


def binary_auc(positive: NDArray[np.bool_], scores: NDArray[np.float64]) -> float:
    """AUROC as the Mann-Whitney statistic (ties count half); ``nan`` without both classes.

    Rank-based rather than sklearn's curve integration: same value, and fast enough for bootstraps.
    """
    positives = int(positive.sum())
    negatives = len(positive) - positives
    if positives == 0 or negatives == 0:
        return NAN
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def per_class_auc(y_true: ArrayLike, probs: ArrayLike, num_classes: int) -> list[float]:
    """One-vs-rest AUROC per class; ``nan`` for a class that is absent from ``y_true`` or is all of it.

    ``y_true`` is either class indices ``(N,)`` (single-label) or a 0/1 indicator matrix ``(N, C)``
    (multi-label); in both cases column ``c`` of ``probs`` scores class ``c``.
    """
    scores = _as_probability_matrix(probs, num_classes)
    truth = np.asarray(y_true)
    if truth.ndim == 1:
        indicator = truth.astype(np.int64)[:, None] == np.arange(num_classes)[None, :]
    elif truth.ndim == 2 and truth.shape[1] == num_classes:
        indicator = truth.astype(bool)
    else:
        raise ValueError(f"y_true must be (N,) class indices or an (N, {num_classes}) indicator")
    if len(indicator) != len(scores):
        raise ValueError(f"y_true has {len(indicator)} entries but probs has {len(scores)}")
    results: list[float] = []
    for column in range(num_classes):
        positives = int(indicator[:, column].sum())
        column_scores = scores[:, column]
        if positives == 0 or positives == len(indicator) or not np.all(np.isfinite(column_scores)):
            results.append(NAN)
            continue
        results.append(binary_auc(indicator[:, column], column_scores))
    return results


def macro_auc(y_true: ArrayLike, probs: ArrayLike, num_classes: int) -> float:
    """One-vs-rest macro AUROC over the classes present in ``y_true``.

    A class absent from ``y_true`` has no positives, so its AUROC is undefined: it is left out of
    the mean rather than counted as 0 or 0.5 (this is what makes the metric usable on small splits
    where a rare grade is missing). With fewer than two classes present the result is ``nan``.
    Non-finite scores for a class also leave that class out. Never raises for data reasons.
    """
    try:
        aucs = per_class_auc(y_true, probs, num_classes)
    except ValueError:
        return NAN
    defined = [value for value in aucs if not np.isnan(value)]
    if not defined:
        return NAN
    return float(np.mean(defined))


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> NDArray[np.int64]:
    """Counts ``[true, predicted]``; labels outside ``0..num_classes-1`` raise ``ValueError``."""
    truth, pred = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    _same_length(truth, pred, "y_pred")
    for name, values in (("y_true", truth), ("y_pred", pred)):
        if len(values) and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} holds a label outside 0..{num_classes - 1}")
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (truth, pred), 1)
    return matrix


def quadratic_kappa(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> float:
    """Cohen's kappa with quadratic weights ``(i-j)^2/(C-1)^2`` (the DR-grading standard).

    ``nan`` when it is undefined: an empty input, one class, or both raters giving one and the
    same grade to every image (the chance disagreement is then zero).
    """
    if num_classes < 2:
        return NAN
    observed = confusion_matrix(y_true, y_pred, num_classes).astype(np.float64)
    total = observed.sum()
    if total == 0:
        return NAN
    grades = np.arange(num_classes, dtype=np.float64)
    weights = (grades[:, None] - grades[None, :]) ** 2 / (num_classes - 1) ** 2
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / total
    chance_disagreement = float((weights * expected).sum())
    if chance_disagreement == 0.0:
        return NAN
    return 1.0 - float((weights * observed).sum()) / chance_disagreement


def f1_per_class(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> list[float]:
    """F1 per class; ``nan`` for a class that appears in neither ``y_true`` nor ``y_pred``.

    A class that is predicted but never true (or true but never predicted) gets F1 = 0.
    """
    matrix = confusion_matrix(y_true, y_pred, num_classes)
    true_positives = np.diag(matrix).astype(np.float64)
    denominator = matrix.sum(axis=0) + matrix.sum(axis=1)  # = 2TP + FP + FN
    return [NAN if denominator[c] == 0 else float(2.0 * true_positives[c] / denominator[c]) for c in range(num_classes)]


def f1_macro(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> float:
    """Mean F1 over the classes that appear in ``y_true`` or ``y_pred``; ``nan`` for an empty input.

    Classes seen in neither are left out: their F1 is 0/0, and counting them as 0 would punish a
    model for a class the split does not contain.
    """
    defined = [value for value in f1_per_class(y_true, y_pred, num_classes) if not np.isnan(value)]
    return float(np.mean(defined)) if defined else NAN


@dataclass(frozen=True)
class ConfidenceInterval:
    """A point estimate with a percentile-bootstrap interval; ``valid_resamples`` says how many counted."""

    estimate: float
    low: float
    high: float
    confidence: float
    valid_resamples: int


def bootstrap_ci(
    metric: Callable[[NDArray[np.generic], NDArray[np.generic]], float],
    y_true: ArrayLike,
    scores: ArrayLike,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> ConfidenceInterval:
    """Percentile bootstrap over samples (rows) of ``metric(y_true, scores)``.

    Resamples where the metric is ``nan`` (e.g. a draw with only one class) are skipped; if fewer
    than half of them are usable the interval is ``(nan, nan)`` because it would be meaningless.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    truth, predictions = np.asarray(y_true), np.asarray(scores)
    if len(truth) != len(predictions):
        raise ValueError(f"y_true has {len(truth)} entries but scores has {len(predictions)}")
    estimate = metric(truth, predictions) if len(truth) else NAN
    rng = np.random.default_rng(seed)
    values: list[float] = []
    for _ in range(resamples if len(truth) else 0):
        index = rng.integers(0, len(truth), size=len(truth))
        value = metric(truth[index], predictions[index])
        if not np.isnan(value):
            values.append(value)
    if len(values) < max(1, resamples // 2):
        return ConfidenceInterval(estimate, NAN, NAN, confidence, len(values))
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return ConfidenceInterval(estimate, float(low), float(high), confidence, len(values))


def macro_auc_ci(
    y_true: ArrayLike,
    probs: ArrayLike,
    num_classes: int,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> ConfidenceInterval:
    """Macro AUROC (see :func:`macro_auc`) with a percentile-bootstrap confidence interval."""
    return bootstrap_ci(
        lambda truth, scores: macro_auc(truth, scores, num_classes),
        y_true,
        probs,
        resamples=resamples,
        confidence=confidence,
        seed=seed,
    )
