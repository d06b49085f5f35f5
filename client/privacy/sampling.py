"""Poisson sampling for DP-SGD: every image joins each step's batch independently with probability q.

The accountant's guarantee assumes exactly this (shuffled fixed-size batches are a different mechanism),
and that the draw is secret, so the sampling generator is seeded from the OS, not from the run seed.
An unreadable image is dropped from its batch instead of being replaced by another image (a
replacement would put that other image into the batch twice, doubling its influence).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar, cast

import numpy as np
import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, Dataset

from visionfm_core.data.items import ImageItem
from visionfm_core.data.transforms import BatchedMultiCrop, MultiCrop, collate_multicrop
from visionfm_core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

T = TypeVar("T")
B = TypeVar("B")


class ReadableImageDataset(Dataset[tuple[Any, int] | None]):
    """(transform(image), label) per item, or None where the file cannot be read (logged on the site)."""

    def __init__(self, items: Sequence[ImageItem], transform: Callable[[np.ndarray], Any]) -> None:
        if len(items) == 0:
            raise DataError("<dataset>", "no images to train on")
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        item = self.items[index]
        try:
            image = item.load()
        except DataError as exc:
            logger.warning("dropped unreadable image %s from a DP batch: %s", exc.path, exc.reason)
            return None
        return self.transform(image), -1 if item.label is None else item.label


class ExactRecordDataset(Dataset[dict[str, Any] | None]):
    """A task dataset whose records name their `index`: a record built from another sample (a stand-in
    for an unreadable one) or marked invalid is dropped (None) instead of used."""

    def __init__(self, dataset: Dataset[dict[str, Any]]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        try:
            record = self.dataset[index]
        except DataError as exc:
            logger.warning("dropped unreadable sample %s from a DP batch: %s", exc.path, exc.reason)
            return None
        if int(record.get("index", index)) != index or not bool(record.get("valid", True)):
            return None
        return record


class _DropMissing(Generic[T, B]):
    """Collate the records that exist; None when none does (an empty Poisson draw)."""

    def __init__(self, collate: Callable[[list[T]], B]) -> None:
        self.collate = collate

    def __call__(self, records: list[T | None]) -> B | None:
        present = [r for r in records if r is not None]
        return self.collate(present) if present else None


class PoissonLoader(Generic[B]):
    """Batches of a dataset drawn by Poisson sampling; yields None for an empty draw.

    One pass yields round(1 / sample_rate) batches (an "epoch" in expectation); iterate again for more.
    `expected_batch_size / len(dataset)` is the sample rate the accountant charges.
    """

    def __init__(
        self,
        dataset: Dataset[Any] | Sequence[Any],
        expected_batch_size: float,
        collate_fn: Callable[[list[Any]], B],
        num_workers: int = 0,
        seed: int | None = None,
    ) -> None:
        size = len(dataset)  # type: ignore[arg-type]
        if size < 1:
            raise DataError("<dataset>", "no images to train on")
        if not 0 < expected_batch_size <= size:
            raise ConfigError(
                "privacy.expected-batch-size",
                f"must lie in (0, {size}] (the number of training images), got {expected_batch_size}",
            )
        self.dataset = dataset
        self.dataset_size = size
        self.expected_batch_size = float(expected_batch_size)
        self.sample_rate = self.expected_batch_size / size
        self.collate_fn = collate_fn
        self.num_workers = int(num_workers)
        self.generator = torch.Generator()
        self.generator.manual_seed(secrets.randbits(63) if seed is None else int(seed))

    def __iter__(self) -> Iterator[B | None]:
        sampler = UniformWithReplacementSampler(
            num_samples=self.dataset_size,
            sample_rate=self.sample_rate,
            generator=self.generator,
            steps=max(1, round(1 / self.sample_rate)),
        )
        # A sequence is a map-style dataset as far as DataLoader is concerned.
        dataset = cast(Dataset[Any], self.dataset)
        loader: DataLoader[Any] = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_DropMissing(self.collate_fn),
        )
        yield from loader

    def __len__(self) -> int:
        return max(1, round(1 / self.sample_rate))


def ssl_poisson_loader(
    items: Sequence[ImageItem],
    transform: Callable[[np.ndarray], Any],
    expected_batch_size: float,
    num_workers: int = 0,
    seed: int | None = None,
) -> PoissonLoader[tuple[list[torch.Tensor], torch.Tensor]]:
    """Poisson-sampled multi-crop batches (`collate_multicrop` format) of a site's training images.
    A `MultiCrop` runs its photometric stage batched in the collate, as the non-private loader does
    (every operation is per image, so no image's crops depend on another's)."""
    if isinstance(transform, MultiCrop):
        per_image: Callable[[np.ndarray], Any] = transform.crop
        collate: Callable[[Any], Any] = BatchedMultiCrop(transform)
    else:
        per_image, collate = transform, collate_multicrop
    return PoissonLoader(
        ReadableImageDataset(items, per_image),
        expected_batch_size,
        collate,
        num_workers=num_workers,
        seed=seed,
    )
