"""Conversions between torch/numpy dicts and Flower records, in one place for client and server.

Arrays travel packed: one flat buffer per dtype plus a small manifest (key, dtype, shape, offset), not
one Flower `Array` per tensor. Flower moves every `Array` (and every 5 MB chunk of one) as an object of
its own, one HTTP request each through the SuperLink and the TLS tunnels; a ViT-S update is about 150
tensors, mostly small, so per-tensor records cost hundreds of requests per message where a packed one
costs about 20. Records without a manifest (written by other apps) are still read key by key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

MANIFEST_KEY = "__manifest__"
PACKED_PREFIX = "__packed__/"


def _as_numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu").contiguous().numpy()
    return np.ascontiguousarray(value)


def arrays_to_record(arrays: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    """An ArrayRecord holding `arrays` packed: one flat `Array` per dtype and a manifest."""
    groups: dict[str, list[np.ndarray]] = {}
    sizes: dict[str, int] = {}
    manifest = []
    for key, value in arrays.items():  # the manifest keeps the dict's order
        array = _as_numpy(value)
        dtype = array.dtype.str
        manifest.append({"key": key, "dtype": dtype, "shape": list(array.shape), "offset": sizes.get(dtype, 0)})
        groups.setdefault(dtype, []).append(array.reshape(-1))
        sizes[dtype] = sizes.get(dtype, 0) + array.size
    record = ArrayRecord()
    for dtype, members in groups.items():
        record[PACKED_PREFIX + dtype] = Array.from_numpy_ndarray(np.concatenate(members))
    record[MANIFEST_KEY] = Array.from_numpy_ndarray(np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8))
    return record


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Numpy arrays keyed like the dict that was packed (views sharing the record's buffers: copy to write).
    Keys stored individually next to a manifest override the packed ones."""
    arrays: dict[str, np.ndarray] = {}
    if MANIFEST_KEY in record:
        manifest = json.loads(bytes(record[MANIFEST_KEY].numpy().tobytes()).decode())
        flats = {dtype: record[PACKED_PREFIX + dtype].numpy() for dtype in {m["dtype"] for m in manifest}}
        for entry in manifest:
            shape = tuple(int(s) for s in entry["shape"])
            size = int(np.prod(shape, dtype=np.int64))
            start = int(entry["offset"])
            arrays[entry["key"]] = flats[entry["dtype"]][start:start + size].reshape(shape)
    for key, array in record.items():
        if key != MANIFEST_KEY and not key.startswith(PACKED_PREFIX):
            arrays[key] = array.numpy()
    return arrays


def record_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Tensors keyed like the dict that was packed (each its own writable copy)."""
    return {key: torch.from_numpy(np.array(array, copy=True)) for key, array in record_to_numpy(record).items()}
