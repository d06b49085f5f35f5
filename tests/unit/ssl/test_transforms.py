"""Multi-crop and eval transforms: shapes, normalisation, per-modality augmentation rules, collation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import simulations
from visionfm_core.data.readers import read_image
from visionfm_core.data.transforms import (
    BatchedMultiCrop,
    MultiCrop,
    augmentation_policy,
    collate_multicrop,
    eval_transform,
    multicrop_transform,
)
from visionfm_core.errors import DataError
from visionfm_core.modalities import MODALITIES, get_modality
from visionfm_core.ssl.config import SSLConfig

DATA = Path(simulations.__file__).parent / "data"
FULL_CROPS = SSLConfig(global_crop_scale=(1.0, 1.0), global_crops=2, local_crops=0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _gradient(vertical: bool, size: int = 40) -> np.ndarray:
    """Bright at the top (vertical) or left (horizontal), dark at the other end, grayscale RGB."""
    ramp = np.linspace(255, 0, size).astype(np.uint8)
    plane = np.repeat(ramp[:, None], size, axis=1) if vertical else np.repeat(ramp[None, :], size, axis=0)
    return np.repeat(plane[:, :, None], 3, axis=2)


def test_multicrop_gives_global_then_local_crops_normalised_float() -> None:
    image = read_image(next((DATA / "oct2017_val" / "val" / "CNV").iterdir()))
    cfg = SSLConfig(global_crops=2, local_crops=3)
    views = multicrop_transform(get_modality("oct"), cfg, image_size=64, patch_size=8)(image)
    assert [tuple(v.shape) for v in views] == [(3, 64, 64)] * 2 + [(3, 24, 24)] * 3
    assert all(v.dtype == torch.float32 for v in views)
    # Normalised with OCT's statistics: roughly zero-centred, not in [0, 1].
    assert float(torch.stack(views[:2]).min()) < 0.0


def test_grayscale_modalities_get_no_colour_changes_and_stay_grey() -> None:
    for modality in MODALITIES.values():
        policy = augmentation_policy(modality)
        if modality.grayscale:
            assert policy.saturation == 0 and policy.hue == 0 and policy.grayscale_prob == 0, modality.name
    oct_modality = get_modality("oct")
    views = multicrop_transform(oct_modality, SSLConfig(), image_size=32)(_gradient(vertical=True))
    for view in views:
        # Equal channel means/stds -> a grey image normalises to three equal channels.
        assert torch.allclose(view[0], view[1]) and torch.allclose(view[1], view[2])


def _top_brighter_fraction(modality_name: str, vertical: bool, draws: int = 40) -> float:
    transform = multicrop_transform(get_modality(modality_name), FULL_CROPS, image_size=32)
    image = _gradient(vertical)
    brighter = 0
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for _ in range(draws):
            view = transform(image)[0][0]
            edges = (view[:4], view[-4:]) if vertical else (view[:, :4], view[:, -4:])
            first, last = edges[0].mean(), edges[1].mean()
            brighter += int(first > last)
    return brighter / draws


@pytest.mark.parametrize("name", ["oct", "ultrasound", "ubm", "mri", "slit_lamp", "external_eye"])
def test_no_vertical_flip_where_the_anatomy_has_an_up(name: str) -> None:
    assert _top_brighter_fraction(name, vertical=True) == 1.0


def test_horizontal_flips_happen_for_every_modality() -> None:
    for name in ("fundus", "oct"):
        assert 0.2 < _top_brighter_fraction(name, vertical=False) < 0.8, name


def test_fundus_colour_jitter_never_shifts_hue() -> None:
    policy = augmentation_policy(get_modality("fundus"))
    assert policy.hue == 0.0 and 0 < policy.saturation <= 0.2
    transform = multicrop_transform(get_modality("fundus"), SSLConfig(), image_size=32)
    assert isinstance(transform, MultiCrop)
    stages = transform.photometric
    assert len(stages) == 2 + SSLConfig().local_crops
    assert all(stage.hue == 0 and stage.saturation > 0 and stage.jitter_prob > 0 for stage in stages)


def test_eval_transform_is_a_deterministic_resize_and_normalisation() -> None:
    fundus = get_modality("fundus")
    transform = eval_transform(fundus, 48)
    constant = np.full((30, 50, 3), (255, 51, 0), dtype=np.uint8)
    out = transform(constant)
    assert tuple(out.shape) == (3, 48, 48)
    for channel, value in enumerate((1.0, 0.2, 0.0)):
        expected = (value - fundus.mean[channel]) / fundus.std[channel]
        assert torch.allclose(out[channel], torch.full((48, 48), expected), atol=1e-5)
    image = read_image(next((DATA / "oct2017_val" / "val" / "DME").iterdir()))
    assert torch.equal(transform(image), transform(image))


def test_transforms_reject_images_that_are_not_rgb_uint8() -> None:
    with pytest.raises(DataError, match="uint8"):
        eval_transform(get_modality("fundus"), 32)(np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(DataError, match="uint8"):
        multicrop_transform(get_modality("fundus"), SSLConfig(), 32)(np.zeros((8, 8, 3), dtype=np.float32))


def test_collate_stacks_each_view_and_the_labels() -> None:
    transform = multicrop_transform(get_modality("fundus"), SSLConfig(local_crops=2), image_size=32)
    image = _gradient(vertical=True)
    views, labels = collate_multicrop([(transform(image), 3), (transform(image), -1), (transform(image), 0)])
    assert [tuple(v.shape) for v in views] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 2
    assert labels.tolist() == [3, -1, 0] and labels.dtype == torch.int64
    with pytest.raises(DataError, match="crops"):
        collate_multicrop([(transform(image), 0), (transform(image)[:2], 0)])


def test_the_batched_loader_path_gives_the_same_views_as_the_per_image_path() -> None:
    transform = multicrop_transform(get_modality("oct"), SSLConfig(local_crops=2), image_size=32)
    image = _gradient(vertical=True)
    collate = BatchedMultiCrop(transform)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        crops = transform.crop(image)
        torch.manual_seed(4)
        batched, labels = collate([(crops, 1)])
    with torch.random.fork_rng():
        torch.manual_seed(3)
        crops_again = transform.crop(image)
        torch.manual_seed(4)
        single = transform.finish([c.unsqueeze(0) for c in crops_again])
    assert all(c.dtype == torch.uint8 for c in crops)
    assert [tuple(v.shape) for v in batched] == [(1, 3, 32, 32)] * 2 + [(1, 3, 16, 16)] * 2
    assert all(torch.equal(a, b) for a, b in zip(batched, single, strict=True)) and labels.tolist() == [1]


def test_fundus_views_come_from_the_field_of_view_not_the_black_border() -> None:
    # A small bright field of view in the corner of a mostly black frame: without the crop to the
    # field of view most views would be black border.
    image = np.zeros((200, 200, 3), np.uint8)
    image[10:60, 20:70] = (200, 120, 60)
    cfg = SSLConfig(global_crop_scale=(0.3, 1.0), global_crops=2, local_crops=4)
    fundus = multicrop_transform(get_modality("fundus"), cfg, image_size=32, patch_size=8)
    assert fundus.fov_crop
    for _ in range(5):
        for view in fundus.crop(image):
            assert float(view.float().mean()) > 60  # every view lies inside the bright field
    oct_views = multicrop_transform(get_modality("oct"), cfg, image_size=32, patch_size=8)
    assert not oct_views.fov_crop  # only fundus photographs have a circular field of view
