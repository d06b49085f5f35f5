"""Decoding happens in DataLoader worker processes and gives the same pixels as in-process decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from visionfm_core.data.datasets import ImageDataset
from visionfm_core.data.loading import make_loader, measure_decode_rate
from visionfm_core.data.site import open_site


def _keep(batch: list) -> list:
    return batch


def test_workers_decode_dicom_frames_and_images_like_the_main_process(mixed_site: Path) -> None:
    items = open_site(mixed_site, "oct", override_tags=True).items
    dataset = ImageDataset(items, lambda image: image)
    loader = make_loader(dataset, batch_size=3, num_workers=2, shuffle=False, collate_fn=_keep)
    decoded = [image for batch in loader for image, _ in batch]
    # cut.jpg cannot be decoded: its slot is filled by the next readable image, the run goes on.
    expected = [dataset[i][0] for i in range(len(dataset))]
    assert len(decoded) == len(items) == 11
    assert all(np.array_equal(a, b) for a, b in zip(decoded, expected, strict=True))
    assert any(source.endswith("cut.jpg") for source in dataset.skipped)


def test_decode_rate_counts_every_item(mixed_site: Path) -> None:
    items = [i for i in open_site(mixed_site, "oct").items if i.source.endswith("volume.dcm")]
    rate = measure_decode_rate(items, num_workers=0, batch_size=2)
    assert rate.images == len(items) == 5 and rate.images_per_second > 0


def test_shuffled_loader_is_reproducible_per_seed(mixed_site: Path) -> None:
    items = [i for i in open_site(mixed_site, "oct").items if i.source.endswith("volume.dcm")]
    dataset = ImageDataset(items, lambda image: float(image.mean()))

    def order(seed: int) -> list[float]:
        return [v for batch, _ in make_loader(dataset, batch_size=5, seed=seed) for v in batch.tolist()]

    assert order(1) == order(1)
    assert sorted(order(1)) == sorted(order(2))
