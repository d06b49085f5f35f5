"""Fixtures for the aggregation tests."""

from __future__ import annotations

import numpy as np
import pytest

from .model_arrays import random_arrays


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def global_model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return random_arrays(rng, scale=0.5)
