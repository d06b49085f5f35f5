"""Packed records: every tensor comes back bit for bit, and the number of Flower objects a message
costs no longer grows with the number of tensors."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from strategies.protocol.records import arrays_to_record, record_to_numpy, record_to_tensors
from visionfm_core.pretraining import initial_global_arrays
from visionfm_core.run_config import RunConfig


def test_mixed_dtypes_and_shapes_round_trip_exactly() -> None:
    arrays = {
        "fundus/backbone.pos_embed": torch.randn(1, 17, 8),
        "fundus/backbone.cls_token": np.float32(0.5) * np.ones((1, 1, 8), np.float32),
        "fundus/steps": torch.tensor(7),  # 0-d, int64
        "oct/q": np.arange(-5, 5, dtype=np.int8).reshape(2, 5),
        "oct/empty": np.zeros((0, 3), np.float32),
        "oct/half": np.linspace(0, 1, 6, dtype=np.float16),
    }
    record = arrays_to_record(arrays)
    back = record_to_numpy(record)
    assert list(back) == list(arrays)
    for key, value in arrays.items():
        expected = value.numpy() if isinstance(value, torch.Tensor) else value
        assert back[key].dtype == expected.dtype and back[key].shape == expected.shape, key
        assert back[key].tobytes() == expected.tobytes(), key
    tensors = record_to_tensors(record)
    tensors["fundus/steps"] += 1  # each tensor is its own writable copy
    assert int(record_to_numpy(record)["fundus/steps"]) == 7


def test_a_models_record_costs_a_few_objects_whatever_its_tensor_count() -> None:
    cfg = RunConfig(arch="nano", image_size=32, patch_size=8, modalities="fundus,oct")
    arrays = initial_global_arrays(cfg)
    assert len(arrays) > 50
    packed = RecordDict({"arrays": arrays_to_record(arrays)})
    one_per_tensor = RecordDict({"arrays": ArrayRecord({k: Array.from_torch_tensor(v) for k, v in arrays.items()})})
    packed_objects, plain_objects = len(get_all_nested_objects(packed)), len(get_all_nested_objects(one_per_tensor))
    # (Flower stores equal tensors once, so a fresh model of 74 tensors is fewer objects than tensors.)
    assert packed_objects <= 8 and plain_objects >= 5 * packed_objects


def test_records_from_other_apps_and_explicit_keys_are_read_key_by_key() -> None:
    legacy = ArrayRecord({"w": Array.from_numpy_ndarray(np.ones(3, np.float32))})
    assert record_to_numpy(legacy)["w"].tolist() == [1.0, 1.0, 1.0]
    record = arrays_to_record({"w": np.zeros(3, np.float32), "b": np.ones(2, np.float32)})
    record["w"] = Array.from_numpy_ndarray(np.full(3, 2.0, np.float32))  # stored beside the packed buffer
    back = record_to_numpy(record)
    assert back["w"].tolist() == [2.0, 2.0, 2.0] and back["b"].tolist() == [1.0, 1.0]
