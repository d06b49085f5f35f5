"""Many sites: which connected sites a round asks (seeded sampling), how long it waits for them (the
round deadline), and what became of the ones that answered too late (stragglers).

The sample of a round is a pure function of the run seed, the round, the phase and the sorted ids of the
connected sites, so a resumed run asks the same sites again; it never depends on what sites report.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np

# A stable stream per phase: training and evaluation of the same round draw independent samples.
_PHASE_STREAM = {"train": 1, "evaluate": 2}


def sample_size(connected: int, fraction: float, min_sites: int) -> int:
    """How many of `connected` sites a round asks: `fraction` of them rounded up, at least `min_sites`,
    at most all."""
    # Rounded first: 0.6 * 5 is 3.0000000000000004 in floating point, which must ask 3 sites, not 4.
    return min(connected, max(min_sites, math.ceil(round(fraction * connected, 9))))


def sample_sites(nodes: Collection[int], fraction: float, min_sites: int, seed: int, server_round: int,
                 phase: str = "train") -> list[int]:
    """The sorted node ids a round sends to: every node when `fraction` covers them all, else a uniform
    sample without replacement drawn from a generator seeded by (seed, round, phase)."""
    ordered = sorted(nodes)
    size = sample_size(len(ordered), fraction, min_sites)
    if size >= len(ordered):
        return ordered
    rng = np.random.default_rng([seed, server_round, _PHASE_STREAM.get(phase, 3)])
    picked = rng.choice(len(ordered), size=size, replace=False)
    return sorted(ordered[int(i)] for i in picked)


@dataclass
class ExchangeOutcome:
    """What one exchange (one message per sampled site) came to."""

    connected: int = 0
    sampled: int = 0
    replied: int = 0
    stragglers: int = 0  # sampled sites that had not answered at the deadline
    late_dropped: int = 0  # earlier rounds' straggler replies that arrived meanwhile and were thrown away

    def as_metrics(self) -> dict[str, float]:
        return {"connected": float(self.connected), "sampled": float(self.sampled), "replied": float(self.replied),
                "stragglers": float(self.stragglers), "late_dropped": float(self.late_dropped)}


@dataclass
class StragglerLedger:
    """Message ids whose replies the coordinator no longer waits for. Their replies, when they come, are
    pulled (so the SuperLink can free them) and dropped unread, and counted."""

    outstanding: set[str] = field(default_factory=set)
    dropped_total: int = 0

    def give_up(self, message_ids: Collection[str]) -> None:
        self.outstanding.update(message_ids)

    def forget(self, message_ids: Collection[str]) -> int:
        """Count late replies that arrived and stop tracking them; returns how many."""
        found = self.outstanding.intersection(message_ids)
        self.outstanding.difference_update(found)
        self.dropped_total += len(found)
        return len(found)


def exchange_deadline(started: float, round_timeout: float, round_deadline: float) -> float:
    """The monotonic time an exchange stops waiting: the round deadline when one is set (> 0) and shorter
    than the round timeout, else the round timeout."""
    limit = round_timeout if round_deadline <= 0 else min(round_deadline, round_timeout)
    return started + limit
