"""The standard SSL evaluation of an encoder on a labelled split: k-NN and linear-probe scores."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from visionfm_core.data.items import ImageItem
from visionfm_core.evaluation.features import extract_features
from visionfm_core.evaluation.knn import knn_predict_proba
from visionfm_core.evaluation.linear_probe import linear_probe_proba
from visionfm_core.evaluation.metrics import accuracy, macro_auc


@dataclass
class ProbeScores:
    """Frozen-feature scores of one encoder on one labelled split."""

    knn_accuracy: float
    knn_auc: float
    linear_accuracy: float
    linear_auc: float
    num_train: int
    num_eval: int

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in self.__dict__.items()}


def probe_scores(
    encoder: nn.Module,
    train_items: Sequence[ImageItem],
    eval_items: Sequence[ImageItem],
    num_classes: int,
    transform: Callable[[np.ndarray], torch.Tensor],
    device: torch.device | str = "cpu",
    k: int = 20,
) -> ProbeScores:
    """k-NN (memory bank = train split) and linear-probe accuracy / macro AUC on the eval split."""
    train_x, train_y = extract_features(encoder, train_items, transform, device)
    eval_x, eval_y = extract_features(encoder, eval_items, transform, device)
    return scores_from_features(train_x, train_y, eval_x, eval_y, num_classes, k)


def scores_from_features(train_x: np.ndarray, train_y: np.ndarray, eval_x: np.ndarray, eval_y: np.ndarray,
                         num_classes: int, k: int = 20) -> ProbeScores:
    """k-NN and linear-probe scores of given features (any feature extractor, or none)."""
    knn = knn_predict_proba(train_x, train_y, eval_x, num_classes, k=k)
    linear = linear_probe_proba(train_x, train_y, eval_x, num_classes)
    return ProbeScores(
        knn_accuracy=accuracy(eval_y, knn.argmax(1)),
        knn_auc=macro_auc(eval_y, knn, num_classes),
        linear_accuracy=accuracy(eval_y, linear.argmax(1)),
        linear_auc=macro_auc(eval_y, linear, num_classes),
        num_train=len(train_y),
        num_eval=len(eval_y),
    )
