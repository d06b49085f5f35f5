"""Modality-aware federated averaging as pure functions (no Flower imports).

Arrays are keyed "<modality>/<parameter name>". Each modality's parameters are averaged over the
sites that sent that modality, weighted by the examples each site trained that modality on. The
running-sum accumulator lets a server fold replies in one at a time, so it never needs every site's
full update in memory at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

MODALITY_SEPARATOR = "/"


def modality_of(key: str) -> str:
    """The modality prefix of a global-model key ("fundus/backbone.cls_token" -> "fundus")."""
    if MODALITY_SEPARATOR not in key:
        raise KeyError(f"array key {key!r} has no '<modality>/' prefix")
    return key.split(MODALITY_SEPARATOR, 1)[0]


def split_by_modality(arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Group a flat dict of arrays by modality prefix."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        groups.setdefault(modality_of(key), {})[key] = value
    return groups


@dataclass
class SiteReply:
    """What one site returned in a round: its arrays and its example count per modality."""

    site: str
    arrays: dict[str, np.ndarray]
    num_examples: dict[str, int]


def weighted_average(updates: list[tuple[Mapping[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """Average dicts with identical keys, weighted by the given non-negative weights (float32 out)."""
    if not updates:
        raise ValueError("nothing to average")
    total = float(sum(weight for _, weight in updates))
    if total <= 0:
        raise ValueError("weights sum to zero")
    keys = list(updates[0][0])
    result: dict[str, np.ndarray] = {}
    for key in keys:
        acc = np.zeros_like(updates[0][0][key], dtype=np.float64)
        for arrays, weight in updates:
            acc += np.asarray(arrays[key], dtype=np.float64) * (weight / total)
        result[key] = acc.astype(np.float32)
    return result


@dataclass
class ModalityAccumulator:
    """Running weighted sums per modality: fold in one reply at a time, read the averages at the end."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    contributors: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reply: SiteReply) -> None:
        """Add one site's arrays, each modality weighted by the site's example count for it."""
        for modality, arrays in split_by_modality(reply.arrays).items():
            weight = float(reply.num_examples.get(modality, 0))
            if weight <= 0:
                continue
            for key, value in arrays.items():
                contribution = np.asarray(value, dtype=np.float64) * weight
                if key in self.sums:
                    self.sums[key] += contribution
                else:
                    self.sums[key] = contribution
            self.weights[modality] = self.weights.get(modality, 0.0) + weight
            self.contributors.setdefault(modality, []).append(reply.site)

    def result(self) -> dict[str, np.ndarray]:
        """The weighted average of every modality that received at least one update."""
        return {
            key: (total / self.weights[modality_of(key)]).astype(np.float32)
            for key, total in self.sums.items()
        }


def aggregate_by_modality(
    replies: Iterable[SiteReply], previous: Mapping[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Average every modality over the sites that sent it; modalities nobody trained keep `previous`."""
    accumulator = ModalityAccumulator()
    for reply in replies:
        accumulator.add(reply)
    merged = dict(previous or {})
    merged.update(accumulator.result())
    return merged
