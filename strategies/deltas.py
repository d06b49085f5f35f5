"""Update deltas and their norms: what a site changed relative to the global model it started from.

Robust aggregation, norm bounding, central DP and secure aggregation all work on deltas, because a
delta is small (it quantises well, clips meaningfully) and is zero for a site that learned nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def delta(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`update - reference` for every key of `update` (float32 out); the reference must hold each key."""
    missing = [key for key in update if key not in reference]
    if missing:
        raise KeyError(f"reference has no array {missing[0]!r}")
    return {key: np.subtract(value, reference[key], dtype=np.float32) for key, value in update.items()}


def apply_delta(reference: Mapping[str, np.ndarray], change: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`reference + change` for the keys of `change`; keys only in `reference` are kept unchanged."""
    result = dict(reference)
    for key, value in change.items():
        if key not in reference:
            raise KeyError(f"reference has no array {key!r}")
        result[key] = np.add(reference[key], value, dtype=np.float32)
    return result


def l2_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of all arrays taken together as one flat vector (accumulated in float64)."""
    total = 0.0
    for value in arrays.values():
        flat = np.asarray(value, dtype=np.float64).ravel()
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def scale(arrays: Mapping[str, np.ndarray], factor: float) -> dict[str, np.ndarray]:
    """Every array multiplied by `factor` (float32 out)."""
    return {key: np.multiply(value, factor, dtype=np.float32) for key, value in arrays.items()}


def clip_to_norm(arrays: Mapping[str, np.ndarray], max_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale `arrays` down so their joint L2 norm is at most `max_norm`; returns (clipped, norm before)."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    norm = l2_norm(arrays)
    if norm <= max_norm:
        return {key: np.asarray(value, dtype=np.float32) for key, value in arrays.items()}, norm
    return scale(arrays, max_norm / norm), norm
