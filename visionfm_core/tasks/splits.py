"""Deterministic train/validation(/test) splits that keep a patient's images together.

Samples are grouped by ``patient_key`` (or by image when there is none), groups are shuffled with
a fixed seed and dealt out per label stratum, so every split gets its share of each class where
the data allows it.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from visionfm_core.errors import ConfigError
from visionfm_core.tasks.samples import TaskSample


def _group_key(sample: TaskSample) -> str:
    return sample.item.patient_key or sample.source


def split_samples(samples: Sequence[TaskSample], fractions: Sequence[float], seed: int = 0) -> list[list[TaskSample]]:
    """Split into ``len(fractions) + 1`` parts: the rest first, then one part per fraction.

    ``split_samples(s, [0.2])`` -> ``[train, val]``; ``[0.15, 0.15]`` -> ``[train, val, test]``.
    A part that would be empty takes at least one group when there are enough groups.
    """
    if any(f <= 0 for f in fractions) or sum(fractions) >= 1:
        raise ConfigError("val_fraction", f"split fractions must be positive and sum below 1, got {list(fractions)}")
    groups: dict[str, list[TaskSample]] = defaultdict(list)
    for sample in samples:
        groups[_group_key(sample)].append(sample)
    strata: dict[int | None, list[str]] = defaultdict(list)
    for key, members in groups.items():
        strata[members[0].label].append(key)
    rng = random.Random(seed)
    parts: list[list[TaskSample]] = [[] for _ in range(len(fractions) + 1)]
    for label in sorted(strata, key=lambda v: -1 if v is None else v):
        keys = sorted(strata[label])
        rng.shuffle(keys)
        start = 0
        for position, fraction in enumerate(fractions, start=1):
            take = round(fraction * len(keys))
            for key in keys[start : start + take]:
                parts[position].extend(groups[key])
            start += take
        for key in keys[start:]:
            parts[0].extend(groups[key])
    for position in range(1, len(parts)):
        if not parts[position] and len(parts[0]) > 1:
            donor = parts[0][-1]
            moved = [s for s in parts[0] if _group_key(s) == _group_key(donor)]
            parts[0] = [s for s in parts[0] if _group_key(s) != _group_key(donor)]
            parts[position].extend(moved)
    return parts


@dataclass
class TaskSplit:
    """One modality's labelled task samples at one site (or pooled), split into train and validation."""

    modality: str
    train: list[TaskSample]
    val: list[TaskSample]
