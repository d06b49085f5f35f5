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
from typing import Any

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


class MalformedRecordError(ValueError):
    """A packed record that cannot be read as arrays (the message says what is wrong, never a value)."""


# The dtypes a packed record may hold: numeric ones only (an object dtype would unpickle, a string
# dtype is not a tensor).
_PACKABLE_KINDS = "biuf"


def _manifest(record: ArrayRecord) -> list[dict[str, Any]]:
    raw = record[MANIFEST_KEY].numpy()
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise MalformedRecordError(f"manifest is {raw.dtype} of shape {raw.shape}, not a uint8 byte string")
    try:
        manifest = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedRecordError(f"manifest is not JSON ({type(exc).__name__})") from exc
    if not isinstance(manifest, list):
        raise MalformedRecordError(f"manifest is a JSON {type(manifest).__name__}, not a list of entries")
    for index, entry in enumerate(manifest):
        if not isinstance(entry, dict) or set(entry) != {"key", "dtype", "shape", "offset"}:
            raise MalformedRecordError(f"manifest entry {index} is not {{key, dtype, shape, offset}}")
        if not isinstance(entry["key"], str) or not isinstance(entry["dtype"], str):
            raise MalformedRecordError(f"manifest entry {index}: key and dtype must be strings")
        shape, offset = entry["shape"], entry["offset"]
        if not isinstance(shape, list) or not all(_count(s) for s in shape) or len(shape) > 32:
            raise MalformedRecordError(f"manifest entry {index} ({entry['key']}): shape is not a list of sizes")
        if not _count(offset):
            raise MalformedRecordError(f"manifest entry {index} ({entry['key']}): offset is not a non-negative int")
    return manifest


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62


def _flat(record: ArrayRecord, dtype: str) -> np.ndarray:
    name = PACKED_PREFIX + dtype
    if name not in record:
        raise MalformedRecordError(f"manifest names dtype {dtype!r} but the record has no {name} buffer")
    try:
        expected = np.dtype(dtype)
    except TypeError as exc:
        raise MalformedRecordError(f"manifest names an unknown dtype {dtype!r}") from exc
    if expected.kind not in _PACKABLE_KINDS:
        raise MalformedRecordError(f"dtype {dtype!r} is not numeric")
    flat = record[name].numpy()
    if flat.dtype != expected or flat.ndim != 1:
        raise MalformedRecordError(f"buffer {name} holds {flat.dtype} of shape {flat.shape}, not flat {expected}")
    return flat


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Numpy arrays keyed like the dict that was packed (views sharing the record's buffers: copy to write).
    Keys stored individually next to a manifest override the packed ones.

    The record may come from an untrusted party: a manifest that is not JSON, has the wrong shape,
    names a missing or non-numeric buffer, repeats a key, or points outside its buffer raises
    `MalformedRecordError` saying which entry is at fault."""
    arrays: dict[str, np.ndarray] = {}
    if MANIFEST_KEY in record:
        manifest = _manifest(record)
        flats = {dtype: _flat(record, dtype) for dtype in {m["dtype"] for m in manifest}}
        for entry in manifest:
            key = entry["key"]
            if key in arrays:
                raise MalformedRecordError(f"manifest names {key!r} twice")
            shape = tuple(entry["shape"])
            size = int(np.prod(shape, dtype=object))
            start = int(entry["offset"])
            flat = flats[entry["dtype"]]
            if start + size > flat.size:
                raise MalformedRecordError(f"manifest entry {key!r} reaches past the end of its "
                                      f"{entry['dtype']} buffer ({start + size} > {flat.size} values)")
            arrays[key] = flat[start:start + size].reshape(shape)
    for key, array in record.items():
        if key != MANIFEST_KEY and not key.startswith(PACKED_PREFIX):
            arrays[key] = array.numpy()
    return arrays


def record_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Tensors keyed like the dict that was packed (each its own writable copy)."""
    return {key: torch.from_numpy(np.array(array, copy=True)) for key, array in record_to_numpy(record).items()}
