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
from visionfm_core.errors import ConfigError, DataError
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


def _striped_fundus(size: int = 600, diameter: int = 560, period: int = 16) -> np.ndarray:
    """A round bright field of view of `diameter` px with vertical stripes of `period` px, black around."""
    yy, xx = np.mgrid[0:size, 0:size]
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (diameter / 2) ** 2
    stripes = np.where((xx // (period // 2)) % 2 == 0, 220, 90)
    image = np.where(inside, stripes, 0).astype(np.uint8)
    return np.repeat(image[:, :, None], 3, axis=2)


def _stripe_edges(view: torch.Tensor) -> float:
    """Mean number of bright/dark changes along a row of a (3, h, w) uint8 view, inside the field."""
    row_bright = view[0].float() > 155
    changes = (row_bright[:, 1:] != row_bright[:, :-1]).sum(dim=1).float()
    return float(changes[view[0].float().mean(dim=1) > 40].mean())


def test_fundus_views_at_a_working_scale_show_the_dense_tasks_pixels_not_the_shrunken_photograph() -> None:
    # The field of view is 560 px wide with a stripe every 16 px. At fov_diameter 1120 (2x) a 64 px view
    # spans 32 source px (2 stripe periods, ~4 edges a row); at 280 (0.5x) it spans 128 (~16 edges). A view
    # resized from the whole field of view would cram 35 periods into 64 px.
    image = _striped_fundus()
    edges = {}
    for diameter in (1120, 280):
        cfg = SSLConfig(global_crops=2, local_crops=2, fov_diameter=diameter, view_zoom=1.0)
        fundus = multicrop_transform(get_modality("fundus"), cfg, image_size=64, patch_size=8)
        torch.manual_seed(0)
        views = [fundus.crop(image) for _ in range(6)]
        assert all(v.shape[-2:] == (64, 64) for vs in views for v in vs[:2])
        assert all(v.shape[-2:] == (24, 24) for vs in views for v in vs[2:])  # local: 3/7, a patch multiple
        edges[diameter] = float(np.mean([_stripe_edges(v) for vs in views for v in vs[:2]]))
    assert 3.0 <= edges[1120] <= 5.5
    assert 13.0 <= edges[280] <= 19.0


def test_working_scale_views_lie_in_the_field_of_view_and_overlap() -> None:
    # A small bright field in the corner of a black frame: every view is centred near one anchor inside
    # it, so no view is black border only, and the views of one image share content.
    image = np.zeros((300, 300, 3), np.uint8)
    yy, xx = np.mgrid[0:300, 0:300]
    image[(yy - 80) ** 2 + (xx - 90) ** 2 <= 60**2] = (200, 120, 60)
    cfg = SSLConfig(global_crops=2, local_crops=4, fov_diameter=240)
    fundus = multicrop_transform(get_modality("fundus"), cfg, image_size=64, patch_size=8)
    for _ in range(10):
        for view in fundus.crop(image):
            assert float((view[0] > 0).float().mean()) > 0.2


def test_a_cached_read_only_photograph_is_resampled_once_and_gives_the_same_views() -> None:
    image = _striped_fundus(200, 180, 8)
    image.flags.writeable = False
    cfg = SSLConfig(global_crops=2, local_crops=2, fov_diameter=120)
    fundus = multicrop_transform(get_modality("fundus"), cfg, image_size=32, patch_size=8)
    torch.manual_seed(1)
    first = fundus.crop(image)
    torch.manual_seed(1)
    fresh = fundus.crop(np.array(image))  # a writable copy: resampled again, not remembered
    assert all(torch.equal(a, b) for a, b in zip(first, fresh, strict=True))
    with pytest.raises(ConfigError):
        SSLConfig(fov_diameter=-1)
