"""Train/validation splits of a site's items that never put one patient on both sides."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from visionfm_core.data.items import ImageItem


@dataclass
class ModalitySplit:
    """One modality's items at one site (or pooled), split into train and validation."""

    modality: str
    train: list[ImageItem]
    val: list[ImageItem]
    num_classes: int
    # Unlabelled images that self-supervised pretraining uses instead of `train` (empty: it uses `train`),
    # e.g. high-resolution photographs while `train`/`val` are the labelled set the probes score on.
    pretrain: list[ImageItem] = field(default_factory=list)

    @property
    def ssl_items(self) -> list[ImageItem]:
        """The images SSL trains on: `pretrain` when given, else the training split."""
        return self.pretrain or self.train


def split_train_val(num_items: int, val_fraction: float, seed: int,
                    groups: Sequence[str | None] | None = None) -> tuple[list[int], list[int]]:
    """Split positions 0..n-1 into train/val. With `groups` (patient keys), a patient's items stay on one
    side so no patient leaks between train and validation."""
    rng = np.random.default_rng(seed)
    if groups is None or all(g is None for g in groups):
        order = rng.permutation(num_items)
        n_val = max(1, round(num_items * val_fraction)) if num_items > 1 else 0
        return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())
    keys = [g if g is not None else f"#item{i}" for i, g in enumerate(groups)]
    unique = sorted(set(keys))
    shuffled = [unique[i] for i in rng.permutation(len(unique))]
    n_val = max(1, round(len(unique) * val_fraction)) if len(unique) > 1 else 0
    val_groups = set(shuffled[:n_val])
    train = [i for i, k in enumerate(keys) if k not in val_groups]
    val = [i for i, k in enumerate(keys) if k in val_groups]
    return train, val
