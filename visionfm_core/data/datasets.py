"""Torch datasets over image items. A file that fails to decode is skipped (logged by name, on the
site only) and the next readable image is returned, so one corrupt file never stops a run."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from visionfm_core.data.items import ImageItem
from visionfm_core.errors import DataError

logger = logging.getLogger(__name__)


class ImageDataset(Dataset[tuple[Any, int]]):
    """(transform(image), label) pairs; label -1 where an item has none."""

    def __init__(self, items: Sequence[ImageItem], transform: Callable[[np.ndarray], Any]) -> None:
        if len(items) == 0:
            raise DataError("<dataset>", "no images to train on")
        self.items = list(items)
        self.transform = transform
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for offset in range(len(self.items)):
            item = self.items[(index + offset) % len(self.items)]
            try:
                image = item.load()
            except DataError as exc:
                if exc.path not in self.skipped:
                    self.skipped[exc.path] = exc.reason
                    logger.warning("skipped unreadable image %s: %s", exc.path, exc.reason)
                continue
            return self.transform(image), -1 if item.label is None else item.label
        raise DataError("<dataset>", "no readable image left")
