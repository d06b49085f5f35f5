"""Partitioners that split one labelled pool of items between simulated sites.

All are deterministic under a seed: "iid" (equal random shares), "dirichlet" (label skew: each class
is divided between sites by Dirichlet(alpha) proportions; small alpha = strong skew) and "quantity"
(sizes drawn from Dirichlet(alpha), labels mixed at random).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from visionfm_core.errors import ConfigError

PARTITIONERS = ("iid", "dirichlet", "quantity")


def partition_indices(
    labels: Sequence[int | None], num_sites: int, kind: str = "iid", alpha: float = 0.5, seed: int = 0,
    min_per_site: int = 2,
) -> list[list[int]]:
    """Indices of `labels` for each site; every site gets at least `min_per_site` items when possible."""
    if num_sites < 1:
        raise ConfigError("sites", "a partition needs at least one site")
    if kind not in PARTITIONERS:
        raise ConfigError("partition.kind", f"unknown partitioner {kind!r}; known: {', '.join(PARTITIONERS)}")
    if kind != "iid" and alpha <= 0:
        raise ConfigError("partition.alpha", f"must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    n = len(labels)
    if num_sites == 1:
        return [list(range(n))]
    if kind == "iid":
        order = rng.permutation(n)
        return [sorted(part.tolist()) for part in np.array_split(order, num_sites)]
    if kind == "quantity":
        shares = rng.dirichlet([alpha] * num_sites)
        return _rebalance(_split_by_shares(rng.permutation(n), shares), min_per_site, rng)
    label_array = np.array([-1 if y is None else y for y in labels])
    parts: list[list[int]] = [[] for _ in range(num_sites)]
    for cls in np.unique(label_array):
        members = rng.permutation(np.flatnonzero(label_array == cls))
        shares = rng.dirichlet([alpha] * num_sites)
        for site, chunk in enumerate(_split_by_shares(members, shares)):
            parts[site].extend(chunk)
    return _rebalance([sorted(p) for p in parts], min_per_site, rng)


def _split_by_shares(order: np.ndarray, shares: np.ndarray) -> list[list[int]]:
    cuts = (np.cumsum(shares)[:-1] * len(order)).round().astype(int)
    return [chunk.tolist() for chunk in np.split(order, cuts)]


def _rebalance(parts: list[list[int]], min_per_site: int, rng: np.random.Generator) -> list[list[int]]:
    """Move items from the largest sites to any site below the minimum, so no site is empty."""
    for site, part in enumerate(parts):
        while len(part) < min_per_site:
            donor = max(range(len(parts)), key=lambda s: len(parts[s]))
            if len(parts[donor]) <= min_per_site:
                break
            part.append(parts[donor].pop(int(rng.integers(len(parts[donor])))))
        parts[site] = sorted(part)
    return parts
