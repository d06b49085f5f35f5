"""A synthetic fundus photograph for the segmentation tests: a bright disc (the field of view) on black
with dark horizontal 'vessels', and the vessel mask."""

from __future__ import annotations

import numpy as np


def synthetic_fundus(size: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 image, bool vessel mask) of `size` (height, width); `seed` places the vessels."""
    rng = np.random.default_rng(seed)
    height, width = size
    ys, xs = np.mgrid[:height, :width]
    inside = (ys - height / 2) ** 2 + (xs - width / 2) ** 2 < (0.45 * min(height, width)) ** 2
    image = np.zeros((height, width, 3), np.uint8)
    image[inside] = (170, 90, 40)
    vessels = np.zeros((height, width), bool)
    for _ in range(4):
        row = int(rng.integers(5, height - 5))
        vessels[row : row + 2] = True
    vessels &= inside
    image[vessels] = (90, 40, 20)
    return image, vessels
