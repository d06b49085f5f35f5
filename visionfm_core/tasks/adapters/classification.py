"""Image classification: binary, multi-class, multi-label and ordinal grading.

- binary / multiclass / ordinal: softmax cross-entropy with label smoothing and optional balanced
  class weights; ordinal grading (e.g. DR grade 0-4) additionally reports quadratic-weighted kappa.
- multilabel: one sigmoid per label, BCE with optional balanced positive weights.
Metrics: accuracy, balanced accuracy (mean recall over the classes present), macro AUROC (classes
absent from the split are left out, see `visionfm_core.evaluation.metrics.macro_auc`), macro F1,
kappa for ordinal tasks, and for binary tasks sensitivity and specificity at the decision threshold.
A binary task's threshold is chosen on validation (the one with the best balanced accuracy,
``best_threshold``) and stored with the model, so a rare positive class is not lost to a 0.5 cut.
``predicted_classes`` counts the classes the model predicts at all: one means a one-class model.
The model is selected on validation macro AUROC, VisionFM's choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from visionfm_core.errors import ConfigError, DataError
from visionfm_core.evaluation.metrics import (
    accuracy,
    f1_macro,
    f1_per_class,
    macro_auc,
    macro_auc_ci,
    quadratic_kappa,
)
from visionfm_core.evaluation.task_metrics import mean_defined
from visionfm_core.models.heads import POOLS, HeadOutput, LinearHead, ProbeHead, TaskHead
from visionfm_core.tasks.adapters.base import Meter, Regime, TaskAdapter
from visionfm_core.tasks.data import Batch
from visionfm_core.tasks.geometry import Window
from visionfm_core.tasks.samples import TaskSample

Mode = Literal["binary", "multiclass", "multilabel", "ordinal"]
MODES: tuple[str, ...] = ("binary", "multiclass", "multilabel", "ordinal")


@dataclass
class ClassificationTask(TaskAdapter):
    """``num_classes`` classes (2 for binary); ``class_names`` index = class id."""

    num_classes: int
    mode: Mode = "multiclass"
    class_names: tuple[str, ...] = ()
    label_smoothing: float = 0.1
    class_weighting: Literal["none", "balanced"] = "none"
    bootstrap_resamples: int = 0
    weights: list[float] = field(default_factory=list)
    threshold: float = 0.5
    # The full fine-tuning head's pooling (see LinearHead); the frozen probe keeps VisionFM's [CLS] MLP.
    # [CLS] plus the mean patch token: on a rare positive class from a small set (bench_class_balance.py)
    # it gave RetinaMNIST AUC 0.802 against [CLS]'s 0.779 (2 seeds) and HRF 0.647 against 0.549.
    pool: str = "token+avg"

    kind = "classification"
    selection_metric = "auc"
    higher_is_better = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError("mode", f"unknown classification mode {self.mode!r}; use {', '.join(MODES)}")
        if self.class_weighting not in ("none", "balanced"):
            raise ConfigError("class_weighting", f"use 'none' or 'balanced', got {self.class_weighting!r}")
        if self.pool not in POOLS:
            raise ConfigError("pool", f"unknown pooling {self.pool!r}; use {', '.join(POOLS)}")
        if self.num_classes < 2:
            raise ConfigError("num_classes", f"classification needs at least 2 classes, got {self.num_classes}")
        if self.mode == "binary" and self.num_classes != 2:
            raise ConfigError("num_classes", "binary classification has exactly 2 classes")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ConfigError("class_names", f"{len(self.class_names)} names for {self.num_classes} classes")
        if not self.class_names:
            self.class_names = tuple(str(i) for i in range(self.num_classes))
        self.class_names = tuple(self.class_names)

    @property
    def multilabel(self) -> bool:
        return self.mode == "multilabel"

    def to_config(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "mode": self.mode,
            "class_names": list(self.class_names),
            "label_smoothing": self.label_smoothing,
            "class_weighting": self.class_weighting,
            "weights": list(self.weights),
            "threshold": self.threshold,
            "pool": self.pool,
        }

    def build_head(self, embed_dim: int, depth: int, patch_size: int, regime: Regime) -> TaskHead:
        if regime == "frozen":
            return ProbeHead(embed_dim, depth, self.num_classes)
        return LinearHead(embed_dim, depth, self.num_classes, pool=self.pool)

    def check(self, samples: Sequence[TaskSample]) -> None:
        for sample in samples:
            if self.multilabel:
                if sample.labels is None or len(sample.labels) != self.num_classes:
                    raise DataError(sample.source, f"multi-label sample needs {self.num_classes} 0/1 labels")
            elif sample.label is None or not 0 <= sample.label < self.num_classes:
                raise DataError(sample.source, f"label {sample.label} is not a class id 0..{self.num_classes - 1}")

    def fit_to_data(self, samples: Sequence[TaskSample]) -> None:
        if self.class_weighting == "none":
            self.weights = []
            return
        if self.multilabel:
            positives = np.array([s.labels for s in samples], dtype=np.float64).sum(axis=0)
            negatives = len(samples) - positives
            self.weights = (negatives / np.maximum(positives, 1.0)).tolist()
        else:
            counts = np.bincount([s.label for s in samples if s.label is not None], minlength=self.num_classes)
            # Inverse frequency normalised to mean 1 over present classes; absent classes keep weight 1.
            inverse = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / self.num_classes, 1.0)
            self.weights = inverse.tolist()

    def prepare(self, sample: TaskSample, window: Window, source_size: tuple[int, int]) -> dict[str, Any]:
        if self.multilabel:
            return {"labels": torch.tensor(sample.labels or (0,) * self.num_classes, dtype=torch.float32)}
        return {"label": -1 if sample.label is None else int(sample.label)}

    def loss(self, outputs: HeadOutput, batch: Batch) -> Tensor:
        assert isinstance(outputs, Tensor)
        logits = outputs.float()
        weight = torch.tensor(self.weights, device=logits.device) if self.weights else None
        if self.multilabel:
            return F.binary_cross_entropy_with_logits(logits, batch["labels"].float(), pos_weight=weight)
        return F.cross_entropy(logits, batch["label"].long(), weight=weight, label_smoothing=self.label_smoothing)

    def probabilities(self, outputs: HeadOutput) -> Tensor:
        assert isinstance(outputs, Tensor)
        return torch.sigmoid(outputs.float()) if self.multilabel else torch.softmax(outputs.float(), dim=1)

    def meter(self) -> Meter:
        return ClassificationMeter(self)

    def predictions(self, outputs: HeadOutput, batch: Batch) -> list[dict[str, Any]]:
        probs = self.probabilities(outputs).cpu().numpy()
        results: list[dict[str, Any]] = []
        for row in probs:
            scores = {name: round(float(p), 6) for name, p in zip(self.class_names, row, strict=True)}
            if self.multilabel:
                results.append({"labels": [n for n, p in scores.items() if p >= 0.5], "probabilities": scores})
            else:
                best = int(self.decide(row[None])[0])
                results.append({"class": self.class_names[best], "class_id": best, "probabilities": scores})
        return results

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """(N, C) probabilities -> (N,) class ids: a binary task cuts at its threshold, others argmax."""
        if self.mode == "binary":
            return (probs[:, 1] >= self.threshold).astype(np.int64)
        return probs.argmax(axis=1)


def balanced_accuracy(truth: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in ``truth`` (nan when none is)."""
    recalls = [float(np.mean(predicted[truth == c] == c)) for c in range(num_classes) if np.any(truth == c)]
    return float(np.mean(recalls)) if recalls else float("nan")


def sensitivity_specificity(truth: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    """Recall of class 1 and of class 0 (nan where the class is absent)."""
    positive, negative = truth == 1, truth == 0
    sensitivity = float(np.mean(predicted[positive] == 1)) if positive.any() else float("nan")
    specificity = float(np.mean(predicted[negative] == 0)) if negative.any() else float("nan")
    return sensitivity, specificity


def youden_threshold(truth: np.ndarray, scores: np.ndarray) -> float:
    """The cut on ``scores`` with the best sensitivity + specificity (0.5 without both classes);
    midway between neighbouring scores, so it generalises rather than touching a training example."""
    if not (np.any(truth == 1) and np.any(truth == 0)):
        return 0.5
    ordered = np.unique(scores)
    cuts = np.concatenate([[ordered[0] - 1e-6], (ordered[1:] + ordered[:-1]) / 2, [ordered[-1] + 1e-6]])
    positive, negative = truth == 1, truth == 0
    best_cut, best_j = 0.5, -np.inf
    for cut in cuts:
        predicted = scores >= cut
        j = float(np.mean(predicted[positive]) + np.mean(~predicted[negative]))
        if j > best_j:
            best_cut, best_j = float(cut), j
    return float(np.clip(best_cut, 0.0, 1.0))


class ClassificationMeter(Meter):
    def __init__(self, task: ClassificationTask) -> None:
        self.task = task
        self.probs: list[np.ndarray] = []
        self.truth: list[np.ndarray] = []

    def update(self, outputs: HeadOutput, batch: Batch) -> None:
        self.probs.append(self.task.probabilities(outputs).detach().cpu().numpy())
        key = "labels" if self.task.multilabel else "label"
        self.truth.append(batch[key].detach().cpu().numpy())

    def compute(self) -> dict[str, float]:
        task = self.task
        if not self.probs:
            return {"auc": float("nan"), "accuracy": float("nan"), "f1": float("nan"), "count": 0.0}
        probs, truth = np.concatenate(self.probs), np.concatenate(self.truth)
        results: dict[str, float] = {
            "count": float(len(truth)),
            "auc": macro_auc(truth, probs, task.num_classes),
        }
        if task.multilabel:
            predicted = (probs >= 0.5).astype(np.int64)
            indicator = truth.astype(np.int64)
            results["accuracy"] = float(np.mean(predicted == indicator))
            # F1 of the positive class of each label, averaged over labels that occur or are predicted.
            per_label = [f1_per_class(indicator[:, c], predicted[:, c], 2)[1] for c in range(task.num_classes)]
            results["f1"] = mean_defined(per_label)
        else:
            predicted = task.decide(probs)
            results["accuracy"] = accuracy(truth, predicted)
            results["balanced_accuracy"] = balanced_accuracy(truth, predicted, task.num_classes)
            results["predicted_classes"] = float(len(np.unique(predicted)))
            results["true_classes"] = float(len(np.unique(truth)))
            results["f1"] = f1_macro(truth, predicted, task.num_classes)
            if task.mode == "binary":
                results["sensitivity"], results["specificity"] = sensitivity_specificity(truth, predicted)
                results["best_threshold"] = youden_threshold(truth, probs[:, 1])
            if task.mode == "ordinal":
                results["kappa"] = quadratic_kappa(truth, predicted, task.num_classes)
        if task.bootstrap_resamples > 0:
            interval = macro_auc_ci(truth, probs, task.num_classes, resamples=task.bootstrap_resamples)
            results["auc_ci_low"], results["auc_ci_high"] = interval.low, interval.high
        return results
