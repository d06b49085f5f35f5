"""Splits keep patients together, are deterministic and stratified."""

from __future__ import annotations

import pytest

from visionfm_core.data.items import ImageItem
from visionfm_core.errors import ConfigError
from visionfm_core.tasks.samples import TaskSample
from visionfm_core.tasks.splits import split_samples


def _samples() -> list[TaskSample]:
    return [TaskSample(ImageItem(f"img{i}", patient_key=f"p{i // 2}"), label=(i // 2) % 3) for i in range(60)]


def test_patients_never_straddle_splits() -> None:
    train, val, test = split_samples(_samples(), [0.2, 0.2], seed=1)
    assert len(train) + len(val) + len(test) == 60
    patients = [{s.item.patient_key for s in part} for part in (train, val, test)]
    assert not (patients[0] & patients[1]) and not (patients[0] & patients[2]) and not (patients[1] & patients[2])


def test_split_is_deterministic_and_stratified() -> None:
    first = split_samples(_samples(), [0.2], seed=3)
    again = split_samples(_samples(), [0.2], seed=3)
    other = split_samples(_samples(), [0.2], seed=4)
    assert [s.source for s in first[1]] == [s.source for s in again[1]]
    assert [s.source for s in first[1]] != [s.source for s in other[1]]
    assert {s.label for s in first[1]} == {0, 1, 2}


def test_tiny_data_still_gets_a_validation_sample() -> None:
    train, val = split_samples([TaskSample(ImageItem(f"i{n}"), label=n) for n in range(3)], [0.1])
    assert len(val) == 1 and len(train) == 2


def test_bad_fractions_are_named() -> None:
    with pytest.raises(ConfigError, match="val_fraction"):
        split_samples(_samples(), [0.6, 0.5])
