"""Decode in DataLoader worker processes, and measure how fast a site's images decode."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from visionfm_core.data.datasets import ImageDataset
from visionfm_core.data.items import ImageItem


def _one_thread_per_worker(_: int) -> None:
    # Each worker decodes one image at a time; letting every worker start its own thread pool would
    # oversubscribe the CPUs that the training process needs.
    torch.set_num_threads(1)


def make_loader(
    dataset: Dataset[Any],
    batch_size: int,
    num_workers: int = 0,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader[Any]:
    """A DataLoader that decodes in `num_workers` processes (0: in this process), reproducible per seed."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
        collate_fn=collate_fn,
        worker_init_fn=_one_thread_per_worker if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
    )


@dataclass(frozen=True)
class DecodeRate:
    """Images decoded, the seconds it took, and the rate."""

    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")


def _shape_only(image: np.ndarray) -> tuple[int, ...]:
    return tuple(image.shape)


def _keep_list(batch: list[Any]) -> list[Any]:
    return batch


def measure_decode_rate(
    items: Sequence[ImageItem],
    num_workers: int = 0,
    batch_size: int = 8,
    transform: Callable[[np.ndarray], Any] = _shape_only,
) -> DecodeRate:
    """Decode every item once through a DataLoader and time it (worker start-up included, as in a
    real epoch). The default transform keeps only the shape, so the rate measures decoding alone."""
    loader = DataLoader(
        ImageDataset(items, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_keep_list,
        worker_init_fn=_one_thread_per_worker if num_workers > 0 else None,
    )
    started = time.perf_counter()
    count = sum(len(batch) for batch in loader)
    return DecodeRate(count, time.perf_counter() - started)
