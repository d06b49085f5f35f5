"""Block-wise iBOT masks: probability of a masked image, ratio bounds, block shape, reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest

from visionfm_core.ssl.masking import BlockMaskGenerator


def _with_masked_neighbours(mask: np.ndarray, at_least: int) -> float:
    """Fraction of masked patches with at least `at_least` masked 4-neighbours."""
    padded = np.pad(mask, 1).astype(int)
    neighbours = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    return float((neighbours[mask] >= at_least).mean())


def test_about_mask_prob_of_images_are_masked_and_each_within_the_ratio_range() -> None:
    generator = BlockMaskGenerator(mask_prob=0.5, mask_ratio=(0.1, 0.5))
    masks = generator.batch_masks(2, 200, 8, 8, np.random.default_rng(0)).numpy()
    counts = masks.reshape(400, -1).sum(axis=1)
    masked = counts > 0
    # 400 Bernoulli(0.5) draws: 4.5 standard deviations is 45 images either way.
    assert abs(int(masked.sum()) - 200) < 45
    low, high = math.floor(0.1 * 64), math.ceil(0.5 * 64)
    assert counts[masked].min() >= low
    assert counts[masked].max() <= high
    # Ratios spread over the range rather than sitting at one value.
    assert counts[masked].std() > 3


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_mask_prob_extremes(prob: float) -> None:
    masks = BlockMaskGenerator(mask_prob=prob).batch_masks(1, 50, 6, 6, np.random.default_rng(1))
    per_image = masks.flatten(1).sum(dim=1)
    assert bool((per_image > 0).all()) if prob == 1.0 else bool((per_image == 0).all())


def test_masks_are_blocks_not_scattered_patches() -> None:
    generator = BlockMaskGenerator(mask_prob=1.0, mask_ratio=(0.2, 0.5))
    rng = np.random.default_rng(2)
    block = np.mean([_with_masked_neighbours(generator.image_mask(14, 14, rng), 2) for _ in range(100)])
    scattered = np.mean([_with_masked_neighbours(rng.random((14, 14)) < 0.35, 2) for _ in range(100)])
    assert block > 0.85
    assert block > scattered + 0.4


def test_block_mask_never_exceeds_its_target_and_shapes_follow_the_grid() -> None:
    generator = BlockMaskGenerator()
    rng = np.random.default_rng(3)
    for target in (0, 1, 5, 20, 100):
        mask = generator.block_mask(4, 5, target, rng)
        assert mask.shape == (4, 5)
        assert mask.sum() <= min(target, 20)
    batch = generator.batch_masks(2, 3, 4, 5, rng)
    assert tuple(batch.shape) == (2, 3, 4, 5)


def test_same_generator_state_gives_the_same_masks() -> None:
    generator = BlockMaskGenerator()
    first = generator.batch_masks(2, 8, 8, 8, np.random.default_rng(7))
    second = generator.batch_masks(2, 8, 8, 8, np.random.default_rng(7))
    assert bool((first == second).all())
