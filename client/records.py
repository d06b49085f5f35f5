"""Conversions between torch/numpy dicts and Flower records, in one place for client and server."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


def arrays_to_record(arrays: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    """An ArrayRecord holding each array under its own key (no copy of contiguous CPU tensors)."""
    record = ArrayRecord()
    for key, value in arrays.items():
        if isinstance(value, torch.Tensor):
            record[key] = Array.from_torch_tensor(value.detach().to("cpu").contiguous())
        else:
            record[key] = Array.from_numpy_ndarray(np.ascontiguousarray(value))
    return record


def record_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Tensors keyed like the record."""
    return {key: torch.from_numpy(np.array(array.numpy(), copy=True)) for key, array in record.items()}


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Numpy arrays keyed like the record."""
    return {key: array.numpy() for key, array in record.items()}
