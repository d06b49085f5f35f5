import numpy as np
import pytest

from strategies.fedavg import (
    ModalityAccumulator,
    SiteReply,
    aggregate_by_modality,
    split_by_modality,
    weighted_average,
)


def _arrays(modality: str, value: float) -> dict[str, np.ndarray]:
    return {f"{modality}/backbone.w": np.full((2, 3), value, np.float32), f"{modality}/head.b": np.array([value])}


def test_weighted_average_is_exact() -> None:
    out = weighted_average([({"a": np.array([1.0, 2.0])}, 1.0), ({"a": np.array([4.0, 8.0])}, 3.0)])
    np.testing.assert_allclose(out["a"], [(1 + 12) / 4, (2 + 24) / 4])
    assert out["a"].dtype == np.float32


def test_each_modality_is_averaged_over_its_own_holders_weighted_by_examples() -> None:
    replies = [
        SiteReply("a", _arrays("fundus", 1.0), {"fundus": 100}),
        SiteReply("b", _arrays("fundus", 3.0), {"fundus": 300}),
        SiteReply("c", {**_arrays("fundus", 5.0), **_arrays("oct", 7.0)}, {"fundus": 100, "oct": 20}),
    ]
    previous = {**_arrays("fundus", 0.0), **_arrays("oct", 0.0), **_arrays("ffa", -1.0)}
    out = aggregate_by_modality(replies, previous)
    np.testing.assert_allclose(out["fundus/backbone.w"], np.full((2, 3), (100 + 900 + 500) / 500))
    # A modality held by one site only takes that site's weights exactly.
    np.testing.assert_allclose(out["oct/backbone.w"], np.full((2, 3), 7.0))
    # A modality nobody trained keeps the previous global weights.
    np.testing.assert_allclose(out["ffa/head.b"], [-1.0])


def test_accumulator_ignores_zero_weight_and_records_contributors() -> None:
    acc = ModalityAccumulator()
    acc.add(SiteReply("a", _arrays("fundus", 2.0), {"fundus": 10}))
    acc.add(SiteReply("b", _arrays("fundus", 100.0), {"fundus": 0}))
    np.testing.assert_allclose(acc.result()["fundus/head.b"], [2.0])
    assert acc.contributors == {"fundus": ["a"]}


def test_keys_without_modality_prefix_are_refused() -> None:
    with pytest.raises(KeyError, match="no '<modality>/' prefix"):
        split_by_modality({"backbone.w": np.zeros(1)})
    with pytest.raises(ValueError):
        weighted_average([])
