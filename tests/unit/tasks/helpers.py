"""Shared fixtures for the downstream-task tests: the bundled real data and tiny encoders."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import simulations
from visionfm_core.data.sources import load_npz_split
from visionfm_core.models.encoders import EncoderSpec, create_encoder
from visionfm_core.tasks.samples import TaskSample

DATA = Path(simulations.__file__).parent / "data"
RETINAMNIST = DATA / "retinamnist" / "retinamnist.npz"


def tiny_encoder(image_size: int = 32, arch: str = "nano", patch_size: int = 16) -> nn.Module:
    return create_encoder(EncoderSpec(arch=arch, image_size=image_size, patch_size=patch_size))


def retinamnist(split: str, count: int) -> list[TaskSample]:
    items = load_npz_split(RETINAMNIST, split).items[:count]
    return [TaskSample(item, label=item.label) for item in items]


@pytest.fixture(autouse=True)
def single_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
