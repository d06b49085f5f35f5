"""Block-wise patch masks for iBOT (the BEiT generator with iBOT's per-image ratio and probability).

Each image is masked with probability `mask_prob`; a masked image gets a target ratio drawn uniformly
from `mask_ratio` (VisionFM: 0.3 +- 0.2 -> (0.1, 0.5)) and rectangles of random area and aspect are
added until the target is reached, so masks are blocks rather than scattered patches (a scattered
mask is too easy to in-paint from neighbours).
"""

from __future__ import annotations

import math

import numpy as np
import torch


class BlockMaskGenerator:
    """Draws [h, w] boolean masks; all randomness comes from the numpy Generator passed in."""

    def __init__(self, mask_prob: float = 0.5, mask_ratio: tuple[float, float] = (0.1, 0.5),
                 min_block_patches: int = 4, min_aspect: float = 0.3) -> None:
        self.mask_prob = mask_prob
        self.mask_ratio = mask_ratio
        self.min_block_patches = min_block_patches
        self.log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))

    def block_mask(self, height: int, width: int, target: int, rng: np.random.Generator) -> np.ndarray:
        """A mask with about `target` patches (never more) made of rectangles."""
        mask = np.zeros((height, width), dtype=bool)
        target = min(max(int(target), 0), height * width)
        count = 0
        failures = 0
        while count < target and failures < 10:
            left_to_mask = target - count
            max_block = max(left_to_mask, 1)
            min_block = min(self.min_block_patches, max_block)
            area = rng.uniform(min_block, max_block)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            if not (0 < h <= height and 0 < w <= width):
                failures += 1
                continue
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            block = mask[top:top + h, left:left + w]
            new = int(h * w - block.sum())
            if 0 < new <= left_to_mask:
                block[...] = True
                count += new
                failures = 0
            else:
                failures += 1
        return mask

    def image_mask(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        """One image's mask: empty with probability 1 - mask_prob, else blocks at a random ratio."""
        if rng.random() >= self.mask_prob:
            return np.zeros((height, width), dtype=bool)
        ratio = rng.uniform(*self.mask_ratio)
        return self.block_mask(height, width, round(ratio * height * width), rng)

    def batch_masks(self, views: int, batch: int, height: int, width: int,
                    rng: np.random.Generator) -> torch.Tensor:
        """[views, batch, height, width] masks for the global views of a batch."""
        masks = np.stack([self.image_mask(height, width, rng) for _ in range(views * batch)])
        return torch.from_numpy(masks.reshape(views, batch, height, width))
