"""Small model-shaped arrays for the aggregation tests (float32, modality-prefixed keys)."""

from __future__ import annotations

import numpy as np

SHAPES = {
    "fundus/backbone.cls_token": (1, 1, 32),
    "fundus/backbone.blocks.0.attn.qkv.weight": (96, 32),
    "fundus/backbone.blocks.0.attn.qkv.bias": (96,),
    "oct/backbone.cls_token": (1, 1, 32),
    "oct/backbone.blocks.0.mlp.fc1.weight": (64, 32),
}


def random_arrays(rng: np.random.Generator, scale: float = 0.02, prefix: str | None = None) -> dict[str, np.ndarray]:
    """Arrays shaped like SHAPES (optionally only one modality's), normal with std `scale`."""
    return {
        key: (rng.normal(0.0, scale, size=shape)).astype(np.float32)
        for key, shape in SHAPES.items()
        if prefix is None or key.startswith(prefix + "/")
    }
