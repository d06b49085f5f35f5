"""Shared fixtures for the downstream-task tests: the bundled real data and tiny encoders."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
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


def random_label_manifest(folder: Path, count: int) -> Path:
    """`count` random 32-px PNG scans labelled a/b alternately, and their labels.csv (absolute paths)."""
    rng = np.random.default_rng(0)
    rows = ["image,label"]
    for number in range(count):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"scan{number}.png")
        rows.append(f"{folder / f'scan{number}.png'},{'ab'[number % 2]}")
    manifest = folder / "labels.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest
