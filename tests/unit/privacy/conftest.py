"""Shared fixtures of the DP tests: one torch thread (2 shared cores) and the bundled real images."""

from __future__ import annotations

from pathlib import Path

import pytest

import simulations
from tests.unit.tasks.helpers import single_torch_thread  # noqa: F401  (autouse fixture)
from visionfm_core.data.items import ImageItem
from visionfm_core.data.sources import load_npz_split

RETINAMNIST = Path(simulations.__file__).parent / "data" / "retinamnist" / "retinamnist.npz"


@pytest.fixture(scope="session")
def fundus_items() -> list[ImageItem]:
    """64 real RetinaMNIST fundus photographs (28 px) with their DR grades."""
    return load_npz_split(RETINAMNIST, "train").items[:64]
