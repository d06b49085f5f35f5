from collections import Counter

import numpy as np
import pytest

from strategies.protocol.partition import partition_indices
from visionfm_core.errors import ConfigError
from visionfm_core.splits import split_train_val

LABELS = [i % 5 for i in range(500)]


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "quantity"])
def test_partitions_cover_every_item_once_and_repeat_under_a_seed(kind: str) -> None:
    parts = partition_indices(LABELS, 4, kind, alpha=0.3, seed=7)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(len(LABELS)))
    assert parts == partition_indices(LABELS, 4, kind, alpha=0.3, seed=7)
    assert all(len(p) >= 2 for p in parts)


def test_small_alpha_skews_labels_more_than_iid() -> None:
    def skew(parts: list[list[int]]) -> float:
        # mean over sites of the largest class share
        return float(np.mean([max(Counter(LABELS[i] for i in p).values()) / len(p) for p in parts]))

    skewed = partition_indices(LABELS, 3, "dirichlet", alpha=0.1, seed=1)
    assert skew(skewed) > skew(partition_indices(LABELS, 3, "iid"))


def test_patient_grouped_split_never_leaks_a_patient() -> None:
    groups = [f"p{i // 3}" for i in range(60)]
    train, val = split_train_val(60, 0.25, seed=3, groups=groups)
    assert set(train).isdisjoint(val) and len(train) + len(val) == 60
    assert {groups[i] for i in train}.isdisjoint({groups[i] for i in val})


def test_unknown_partitioner_is_named() -> None:
    with pytest.raises(ConfigError, match=r"partition\.kind"):
        partition_indices(LABELS, 2, "shards")
