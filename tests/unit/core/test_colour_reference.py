"""The colour-statistics reference: exact statistics, and a probe that reads label information from colour
on the bundled RetinaMNIST but not from labels shuffled away from the images."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from simulations.compare import reference_rows, write_comparison
from strategies.protocol.datasets import load_dataset
from visionfm_core.evaluation.baselines import colour_reference, colour_statistics


def test_colour_statistics_are_channel_means_then_standard_deviations_in_unit_range() -> None:
    image = np.zeros((2, 2, 3), np.uint8)
    image[..., 0] = [[0, 255], [0, 255]]
    image[..., 2] = 51
    np.testing.assert_allclose(colour_statistics(image), [0.5, 0.0, 0.2, 0.5, 0.0, 0.0], atol=1e-6)
    wide = image.astype(np.uint16) * 257  # the same picture in 16 bits
    np.testing.assert_allclose(colour_statistics(wide), colour_statistics(image), atol=1e-6)


def test_colour_carries_dr_grade_information_that_shuffled_labels_do_not() -> None:
    data = load_dataset("retinamnist")
    real = colour_reference(data.pool, data.test, data.num_classes)
    assert real.num_train == len(data.pool) and real.num_eval == len(data.test)
    assert real.linear_auc > 0.65 and real.knn_auc > 0.6
    rng = np.random.default_rng(0)
    labels = rng.permutation([item.label for item in data.pool])
    shuffled = [replace(item, label=int(label)) for item, label in zip(data.pool, labels, strict=True)]
    chance = colour_reference(shuffled, data.test, data.num_classes)
    assert chance.linear_auc < 0.6 and chance.linear_auc < real.linear_auc - 0.1


def test_the_comparison_lists_the_reference_without_a_round_0(tmp_path: Path) -> None:
    scores = {"knn_accuracy": 0.5, "knn_auc": 0.69, "linear_accuracy": 0.505, "linear_auc": 0.72}
    path = write_comparison(tmp_path, reference_rows({"fundus": scores}))
    assert "| reference | colour statistics | fundus | 0.500 | 0.690 | 0.505 | 0.720 |" in path.read_text()
