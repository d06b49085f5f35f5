"""Poisson sampling: independent membership at the promised rate, empty draws, unreadable images dropped
(never replaced by another image), and secret default seeds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.privacy.sampling import (
    ExactRecordDataset,
    PoissonLoader,
    ReadableImageDataset,
    ssl_poisson_loader,
)
from visionfm_core.data.items import ImageItem
from visionfm_core.data.transforms import eval_transform
from visionfm_core.errors import ConfigError
from visionfm_core.modalities import get_modality
from visionfm_core.tasks.adapters.classification import ClassificationTask
from visionfm_core.tasks.data import Preprocess, TaskDataset, collate
from visionfm_core.tasks.samples import TaskSample


def _indices(records: list[int]) -> list[int]:
    return records


def test_every_record_joins_each_batch_independently_at_the_sample_rate() -> None:
    loader = PoissonLoader(list(range(200)), expected_batch_size=20, collate_fn=_indices, seed=7)
    assert loader.sample_rate == pytest.approx(0.1) and len(loader) == 10
    counts = torch.zeros(200)
    sizes = []
    for _ in range(30):  # 300 draws
        for batch in loader:
            assert batch is not None and len(set(batch)) == len(batch)  # never twice in one batch
            counts[batch] += 1
            sizes.append(len(batch))
    assert len(sizes) == 300
    assert len(set(sizes)) > 5  # the batch size varies, as Poisson sampling requires
    assert sum(sizes) / 300 == pytest.approx(20, rel=0.05)
    # Per record: Binomial(300, 0.1), mean 30, std about 5.2.
    assert counts.mean() == pytest.approx(30, rel=0.05) and counts.min() > 15 and counts.max() < 50


def test_an_empty_draw_is_none() -> None:
    loader = PoissonLoader(list(range(10)), expected_batch_size=0.05, collate_fn=_indices, seed=0)
    draws = [batch for _ in range(2) for batch in loader]
    assert draws.count(None) > 0.9 * len(draws)


def test_the_default_seed_is_secret_and_differs_between_loaders() -> None:
    first = PoissonLoader(list(range(500)), 50, _indices)
    second = PoissonLoader(list(range(500)), 50, _indices)
    assert next(iter(first)) != next(iter(second))
    with pytest.raises(ConfigError, match="expected-batch-size"):
        PoissonLoader(list(range(5)), 6, _indices)


def test_an_unreadable_image_is_dropped_not_replaced(fundus_items: list[ImageItem], tmp_path: Path) -> None:
    broken = ImageItem(source=str(tmp_path / "missing.png"), label=1)
    items = [fundus_items[0], broken, fundus_items[1]]
    dataset = ReadableImageDataset(items, eval_transform(get_modality("fundus"), 32))
    assert dataset[1] is None
    loader = ssl_poisson_loader(
        items,
        lambda image: [eval_transform(get_modality("fundus"), 32)(image)],
        expected_batch_size=3,
        seed=0,
    )  # sample rate 1: everything is drawn
    batch = next(iter(loader))
    assert batch is not None
    views, labels = batch
    assert views[0].shape == (2, 3, 32, 32)
    assert labels.tolist() == [fundus_items[0].label, fundus_items[1].label]


def test_a_task_records_stand_in_is_dropped(fundus_items: list[ImageItem], tmp_path: Path) -> None:
    samples = [
        TaskSample(fundus_items[0], label=0),
        TaskSample(ImageItem(str(tmp_path / "gone.png")), label=1),
        TaskSample(fundus_items[2], label=2),
    ]
    task = ClassificationTask(num_classes=3)
    dataset = TaskDataset(samples, Preprocess.for_modality("fundus", 32), task.prepare, train=True)
    assert dataset[1]["index"] == 2  # the plain dataset silently substitutes the next sample
    exact = ExactRecordDataset(dataset)
    assert exact[1] is None and exact[0] is not None
    batch = next(iter(PoissonLoader(exact, 3, collate, seed=0)))
    assert batch is not None and batch["index"].tolist() == [0, 2] and batch["label"].tolist() == [0, 2]
