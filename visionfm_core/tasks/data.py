"""Task datasets: load an image, choose its window, resample it and let the task adapter place its
targets in the same window. One dataset class serves every task.

An unreadable image or target never stops a run: in training the next readable sample takes its
place; in evaluation the sample is marked invalid and left out of the metrics (``skipped`` names
it, on the site only).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from visionfm_core.errors import DataError
from visionfm_core.modalities import get_modality
from visionfm_core.tasks.geometry import Window, letterbox, random_window, resample_image
from visionfm_core.tasks.samples import TaskSample

logger = logging.getLogger(__name__)

Batch = dict[str, Any]
TargetPreparer = Callable[[TaskSample, Window, tuple[int, int]], dict[str, Any]]


@dataclass(frozen=True)
class Preprocess:
    """Input size, normalisation and training augmentation (zoom, mirror, brightness/contrast)."""

    image_size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_zoom: float = 1.15
    flip: bool = True
    jitter: float = 0.1

    @classmethod
    def for_modality(cls, modality: str, image_size: int, **options: Any) -> Preprocess:
        mod = get_modality(modality)
        return cls(image_size=image_size, mean=mod.mean, std=mod.std, **options)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Preprocess:
        values = dict(raw)
        values["mean"], values["std"] = tuple(values["mean"]), tuple(values["std"])
        return cls(**values)

    def window(self, height: int, width: int, train: bool) -> Window:
        if not train:
            return letterbox(height, width, self.image_size)
        return random_window(height, width, self.image_size, self.max_zoom, self.flip)

    def normalise(self, image: Tensor, train: bool) -> Tensor:
        if train and self.jitter > 0:
            draws = (torch.rand(2) * 2 - 1) * self.jitter
            image = ((image - image.mean()) * (1 + draws[0]) + image.mean() * (1 + draws[1])).clamp_(0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (image - mean) / std


class TaskDataset(Dataset[Batch]):
    """Samples -> dicts with ``image`` (3, S, S), ``window`` (5,), ``index``, ``valid`` and targets."""

    def __init__(
        self, samples: Sequence[TaskSample], preprocess: Preprocess, prepare: TargetPreparer, train: bool
    ) -> None:
        if len(samples) == 0:
            raise DataError("<dataset>", "no samples")
        self.samples = list(samples)
        self.preprocess = preprocess
        self.prepare = prepare
        self.train = train
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _build(self, index: int) -> Batch:
        sample = self.samples[index]
        image = sample.item.load()
        height, width = image.shape[:2]
        window = self.preprocess.window(height, width, self.train)
        record: Batch = {
            "image": self.preprocess.normalise(resample_image(image, window), self.train),
            "window": window.as_tensor(),
            "source_size": torch.tensor([height, width]),
            "index": index,
            "valid": True,
        }
        record.update(self.prepare(sample, window, (height, width)))
        return record

    def _skip(self, exc: DataError) -> None:
        if exc.path not in self.skipped:
            self.skipped[exc.path] = exc.reason
            logger.warning("skipped sample %s: %s", exc.path, exc.reason)

    def __getitem__(self, index: int) -> Batch:
        if not self.train:
            try:
                return self._build(index)
            except DataError as exc:
                self._skip(exc)
                return self._invalid(index)
        for offset in range(len(self.samples)):
            try:
                return self._build((index + offset) % len(self.samples))
            except DataError as exc:
                self._skip(exc)
        raise DataError("<dataset>", "no readable sample left")

    def _invalid(self, index: int) -> Batch:
        """A stand-in with the right shapes, so batching works; ``valid`` False drops it later."""
        for other in range(len(self.samples)):
            if other != index and self.samples[other].source not in self.skipped:
                try:
                    record = self._build(other)
                except DataError as exc:
                    self._skip(exc)
                    continue
                record.update(index=index, valid=False)
                return record
        raise DataError("<dataset>", "no readable sample left")


def collate(records: list[Batch]) -> Batch:
    """Stack tensors of equal shape; keep lists for anything ragged (e.g. boxes per image)."""
    batch: Batch = {}
    for key in records[0]:
        values = [r[key] for r in records]
        if isinstance(values[0], Tensor) and all(v.shape == values[0].shape for v in values):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], bool | int | float):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


def select(batch: Batch, keep: Tensor) -> Batch:
    """The rows of a batch where ``keep`` is true (tensors and lists alike)."""
    rows = keep.nonzero().flatten().tolist()
    out: Batch = {}
    for key, value in batch.items():
        if isinstance(value, Tensor):
            out[key] = value[keep]
        else:
            out[key] = [value[i] for i in rows]
    return out


def move(batch: Batch, device: torch.device) -> Batch:
    """Tensors (and tensor lists) of a batch on ``device``."""
    out: Batch = {}
    for key, value in batch.items():
        if isinstance(value, Tensor):
            out[key] = value.to(device, non_blocking=True)
        elif isinstance(value, list) and value and isinstance(value[0], Tensor):
            out[key] = [v.to(device, non_blocking=True) for v in value]
        else:
            out[key] = value
    return out
