"""Byzantine-robust aggregation: coordinate-wise median, trimmed mean, (Multi-)Krum, norm bounding.

Each aggregator is a pure function over one modality's list of `(arrays, weight)` pairs, the same
shape `strategies.fedavg.weighted_average` takes, so `aggregate_per_modality` can apply any of them
modality by modality. Median, trimmed mean and Krum's distances are translation invariant, so they
give the same model whether fed full weights or deltas from the global model (deltas are cheaper to
inspect); norm bounding needs the global model as its reference and is applied before any of them.

Weights: median and trimmed mean are unweighted on purpose (a large example count must not buy an
attacker more influence); Multi-Krum averages its selected updates by weight.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from strategies.deltas import clip_to_norm, delta
from strategies.fedavg import SiteReply, split_by_modality, weighted_average
from visionfm_core.errors import ConfigError

logger = logging.getLogger(__name__)

Update = tuple[Mapping[str, np.ndarray], float]
Aggregator = Callable[[Sequence[Update]], dict[str, np.ndarray]]


def _keys(updates: Sequence[Update]) -> list[str]:
    if not updates:
        raise ValueError("nothing to aggregate")
    keys = list(updates[0][0])
    for index, (arrays, _) in enumerate(updates[1:], start=1):
        if set(arrays) != set(keys):
            raise KeyError(f"update {index} has different keys from update 0")
    return keys


def _stack(updates: Sequence[Update], key: str) -> np.ndarray:
    return np.stack([np.asarray(arrays[key], dtype=np.float32) for arrays, _ in updates])


def coordinate_median(updates: Sequence[Update]) -> dict[str, np.ndarray]:
    """The unweighted median of every coordinate (mean of the two middle values for even counts)."""
    return {key: np.median(_stack(updates, key), axis=0).astype(np.float32) for key in _keys(updates)}


def trimmed_mean(updates: Sequence[Update], beta: float) -> dict[str, np.ndarray]:
    """Per coordinate, drop the floor(beta * n) largest and smallest values and average the rest."""
    if not 0.0 <= beta < 0.5:
        raise ConfigError("robust.trim_beta", f"must lie in [0, 0.5), got {beta}")
    keys = _keys(updates)
    count = len(updates)
    trim = int(beta * count)
    result: dict[str, np.ndarray] = {}
    for key in keys:
        ordered = np.sort(_stack(updates, key), axis=0)
        kept = ordered[trim : count - trim]
        result[key] = kept.mean(axis=0, dtype=np.float64).astype(np.float32)
    return result


def pairwise_sq_distances(updates: Sequence[Update]) -> np.ndarray:
    """Squared L2 distances between every pair of updates (all keys as one vector), float64 (n, n)."""
    keys = _keys(updates)
    count = len(updates)
    distances = np.zeros((count, count), dtype=np.float64)
    for key in keys:
        flat = _stack(updates, key).reshape(count, -1).astype(np.float64)
        squares = np.einsum("ij,ij->i", flat, flat)
        gram = flat @ flat.T
        distances += squares[:, None] + squares[None, :] - 2.0 * gram
    np.fill_diagonal(distances, 0.0)
    # Cancellation in the expansion can leave tiny negatives.
    return np.maximum(distances, 0.0)


def krum_scores(updates: Sequence[Update], num_byzantine: int) -> np.ndarray:
    """Krum score per update: sum of squared distances to its n - f - 2 nearest other updates."""
    count = len(updates)
    if num_byzantine < 0:
        raise ConfigError("robust.num_byzantine", f"must be >= 0, got {num_byzantine}")
    if count < 2 * num_byzantine + 3:
        raise ConfigError(
            "robust.num_byzantine",
            f"Krum needs at least 2f+3 = {2 * num_byzantine + 3} updates, got {count}",
        )
    distances = pairwise_sq_distances(updates)
    closest = count - num_byzantine - 2
    scores = np.empty(count, dtype=np.float64)
    for index in range(count):
        others = np.delete(distances[index], index)
        scores[index] = np.sort(others)[:closest].sum()
    return scores


def krum_select(updates: Sequence[Update], num_byzantine: int, num_selected: int = 1) -> list[int]:
    """Indices of the `num_selected` updates with the lowest Krum scores (ties keep input order)."""
    if not 1 <= num_selected <= len(updates) - num_byzantine:
        raise ConfigError(
            "robust.num_selected",
            f"must lie in [1, n - f] = [1, {len(updates) - num_byzantine}], got {num_selected}",
        )
    scores = krum_scores(updates, num_byzantine)
    return [int(i) for i in np.argsort(scores, kind="stable")[:num_selected]]


def krum(updates: Sequence[Update], num_byzantine: int, num_selected: int = 1) -> dict[str, np.ndarray]:
    """Krum (num_selected=1) or Multi-Krum: the weighted average of the best-scored updates."""
    chosen = krum_select(updates, num_byzantine, num_selected)
    return weighted_average([updates[i] for i in chosen])


def bound_update_norms(updates: Sequence[Update], reference: Mapping[str, np.ndarray], max_norm: float) -> list[Update]:
    """Clip each update's delta from `reference` to L2 norm `max_norm`; returns weights, not deltas."""
    if not max_norm > 0:
        raise ConfigError("robust.max_update_norm", f"must be positive, got {max_norm}")
    bounded: list[Update] = []
    for arrays, weight in updates:
        clipped, norm = clip_to_norm(delta(arrays, reference), max_norm)
        if norm > max_norm:
            logger.info("update norm %.4g bounded to %.4g", norm, max_norm)
        bounded.append(
            ({key: np.add(reference[key], value, dtype=np.float32) for key, value in clipped.items()}, weight)
        )
    return bounded


def aggregate_per_modality(
    replies: Iterable[SiteReply],
    aggregate: Aggregator,
    previous: Mapping[str, np.ndarray] | None = None,
    max_update_norm: float | None = None,
) -> dict[str, np.ndarray]:
    """Apply `aggregate` to each modality over the sites that sent it, weighted by their example counts.

    With `max_update_norm`, each site's per-modality delta from `previous` is bounded first.
    Modalities nobody sent keep their arrays from `previous`.
    """
    groups: dict[str, list[Update]] = {}
    for reply in replies:
        for modality, arrays in split_by_modality(reply.arrays).items():
            groups.setdefault(modality, []).append((arrays, float(reply.num_examples.get(modality, 0))))
    merged = dict(previous or {})
    for modality, updates in groups.items():
        if max_update_norm is not None:
            if previous is None:
                raise ConfigError("robust.max_update_norm", "norm bounding needs the previous global model")
            updates = bound_update_norms(updates, previous, max_update_norm)
        logger.debug("aggregating modality %s over %d sites", modality, len(updates))
        merged.update(aggregate(updates))
    return merged
