"""Classification with a rare positive class: balanced weighting, a threshold chosen on validation,
balanced accuracy / sensitivity / specificity, the one-class warning, and a seed that repeats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.unit.tasks.helpers import tiny_encoder
from visionfm_core.data.items import items_from_arrays
from visionfm_core.tasks.adapters import ClassificationTask
from visionfm_core.tasks.adapters.classification import balanced_accuracy, youden_threshold
from visionfm_core.tasks.data import Preprocess
from visionfm_core.tasks.samples import TaskSample
from visionfm_core.tasks.trainer import FineTuneConfig, FineTuner

PLAIN = Preprocess(image_size=32, max_zoom=1.0, flip=False, jitter=0.0)


def imbalanced(count: int, positive_rate: float, seed: int) -> list[TaskSample]:
    """Noise images; the rare positives carry a faint bright square (learnable, not trivial)."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(count) < round(count * positive_rate)).astype(np.int64)
    rng.shuffle(labels)
    images = rng.integers(60, 140, size=(count, 32, 32, 3)).astype(np.uint8)
    images[labels == 1, 8:24, 8:24] += 50
    items = items_from_arrays(images, labels, f"toy{seed}")
    return [TaskSample(item, label=int(item.label)) for item in items if item.label is not None]


def test_balanced_accuracy_and_youden_threshold() -> None:
    truth = np.array([0, 0, 0, 0, 1])
    assert balanced_accuracy(truth, np.zeros(5, np.int64), 2) == 0.5  # the majority class: chance
    scores = np.array([0.1, 0.2, 0.3, 0.35, 0.4])
    cut = youden_threshold(truth, scores)
    assert 0.35 < cut <= 0.4  # a 0.5 cut would call the positive negative


@pytest.mark.parametrize("seed", [0, 1])
def test_balanced_defaults_never_give_a_one_class_model(seed: int) -> None:
    task = ClassificationTask(2, mode="binary", class_weighting="balanced")
    config = FineTuneConfig(epochs=2, batch_size=16, min_steps=40, lr=3e-3, mixed_precision=False, seed=seed)
    train, val = imbalanced(80, 0.15, seed), imbalanced(40, 0.15, 10 + seed)
    result = FineTuner(task, config).fit(tiny_encoder(32), train, val, PLAIN)
    validation = result.best_validation
    assert validation["predicted_classes"] == 2
    assert validation["sensitivity"] > 0 and validation["specificity"] > 0
    assert {"balanced_accuracy", "auc", "best_threshold"} <= set(validation)
    assert task.threshold == validation["best_threshold"]
    assert not any("one class" in w for w in result.warnings)


def test_warns_when_the_model_predicts_one_class() -> None:
    # Unweighted, with a learning rate too small to move: every image gets the same class.
    task = ClassificationTask(2, mode="multiclass", class_weighting="none")
    config = FineTuneConfig(epochs=2, batch_size=8, lr=1e-12, min_lr=1e-13, mixed_precision=False)
    result = FineTuner(task, config).fit(tiny_encoder(32), imbalanced(24, 0.15, 3), imbalanced(20, 0.2, 4), PLAIN)
    assert result.best_validation["predicted_classes"] == 1
    assert any("predicts one class" in w for w in result.warnings)


def test_a_seed_gives_the_same_model_twice() -> None:
    def run() -> dict[str, torch.Tensor]:
        task = ClassificationTask(2, mode="binary", class_weighting="balanced")
        config = FineTuneConfig(epochs=2, batch_size=8, min_steps=6, mixed_precision=False, seed=7)
        augmenting = Preprocess(image_size=32)  # random zoom, flips and jitter: all drawn from the seed
        torch.manual_seed(123)  # the encoder's own initialisation is the caller's; keep it fixed
        encoder = tiny_encoder(32)
        result = FineTuner(task, config).fit(encoder, imbalanced(24, 0.25, 5), imbalanced(12, 0.25, 6), augmenting)
        return result.model.state_dict()

    first, second = run(), run()
    for key, value in first.items():
        assert torch.equal(value, second[key]), key
