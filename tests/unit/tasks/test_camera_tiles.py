"""Camera tiles: a training tile as a coarser camera storing JPEG would deliver it, compressed before the
local contrast standardisation, with the mask and field of view where they were, and seeded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.unit.tasks.test_camera_robustness import synthetic_fundus
from visionfm_core.data.items import ImageItem
from visionfm_core.data.preprocess_contrast import local_contrast, local_statistics
from visionfm_core.errors import ConfigError
from visionfm_core.tasks.adapters import SegmentationTask
from visionfm_core.tasks.camera import Camera, RawPhotograph, camera_tile, draw_camera, jpeg_roundtrip
from visionfm_core.tasks.data import Preprocess, TaskDataset
from visionfm_core.tasks.geometry import Window, resample_image
from visionfm_core.tasks.samples import TaskSample
from visionfm_core.tasks.tiles import FieldOfView

SIDE = 320


def fundus() -> tuple[np.ndarray, FieldOfView]:
    image, _ = synthetic_fundus(SIDE, 3)  # a vessel narrower than the standardisation's neighbourhood
    return image, FieldOfView.of(image, detect=True)


def kept(image: np.ndarray, fov: FieldOfView, finest: float = 1.0) -> tuple[RawPhotograph, np.ndarray]:
    """The photograph kept for camera tiles (with its statistics) and its standardised version."""
    result = local_statistics(image, fov.mask, fov.width)
    assert result is not None
    statistics, standardised = result
    assert np.array_equal(standardised, local_contrast(image, fov.mask, fov.width))
    return RawPhotograph.keep(image, fov, finest, statistics), standardised


def test_jpeg_roundtrip_loses_more_at_lower_quality() -> None:
    image, _ = synthetic_fundus(96, 3)
    errors = [np.abs(jpeg_roundtrip(image, q).astype(int) - image).mean() for q in (95, 60, 10)]
    assert jpeg_roundtrip(image, 60).shape == image.shape
    assert 0 < errors[0] < errors[1] < errors[2]


def test_draw_camera_is_off_at_zero_without_drawing_and_seeded_within_its_ranges() -> None:
    torch.manual_seed(3)
    before = torch.get_rng_state()
    assert draw_camera(0.0, (40, 95), 2.0) is None
    assert torch.equal(torch.get_rng_state(), before)  # a run without the augmentation draws as before
    cameras = [draw_camera(1.0, (40, 95), 2.0) for _ in range(64)]
    assert all(c is not None and 40 <= c.quality <= 95 and 1.0 <= c.coarseness <= 2.0 for c in cameras)
    assert len({c.quality for c in cameras if c is not None}) > 10
    torch.manual_seed(3)
    assert [draw_camera(1.0, (40, 95), 2.0) for _ in range(64)] == cameras
    drawn = [draw_camera(0.5, (75, 75), 1.0) for _ in range(200)]
    assert 60 < sum(c is not None for c in drawn) < 140


def whole_window(size: int, flip: bool = False, side: int = SIDE) -> Window:
    return Window(0.0, 0.0, float(side), size, flip=flip)


def test_camera_tile_is_the_standardised_window_and_black_outside_the_fov() -> None:
    image, fov = fundus()
    raw, standardised = kept(image, fov)
    window = whole_window(SIDE)
    tile = camera_tile(raw, window, Camera(95))
    reference = resample_image(standardised, window)
    assert tile.shape == (3, SIDE, SIDE) and float(tile.min()) >= 0 and float(tile.max()) <= 1
    # The speckle differs after compression; the column profile (vessel, illumination) does not.
    profile = lambda t: t[1, 120:200, 60:260].mean(dim=0).numpy()  # noqa: E731
    assert np.corrcoef(profile(tile), profile(reference))[0, 1] > 0.9
    assert float(tile[:, ~torch.from_numpy(fov.mask)].abs().max()) == 0.0
    # The vessel (dark, vertical, through the middle) stays where the mask has it.
    green = tile[1, SIDE // 2 - 40 : SIDE // 2 + 40].mean(dim=0)
    assert abs(int(green[40:280].argmin()) + 40 - SIDE // 2) <= 1
    # A mirrored window gives the mirrored tile.
    assert torch.equal(camera_tile(raw, whole_window(SIDE, flip=True), Camera(95)), tile.flip(-1))
    # Standardised with the whole photograph's statistics: at the tile's own resolution (no resampling)
    # a window of it that left out the JPEG would equal the lossless tile.
    part = Window(100.0, 90.0, 64.0, 64)
    lossless = camera_tile(raw, part, Camera(100)) - resample_image(standardised, part)
    assert float(lossless[1].abs().mean()) < 0.05


def faint_stripes(side: int) -> tuple[np.ndarray, FieldOfView]:
    """A flat, dim photograph whose only detail is vertical stripes 3 grey levels deep."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    inside = np.hypot(yy - side / 2, xx - side / 2) < 0.45 * side
    stripes = 3 * np.sin(2 * np.pi * xx / 16)
    image = np.stack([150 + stripes, 90 + stripes, 40 + stripes], axis=-1).round() * inside[..., None]
    return image.astype(np.uint8), FieldOfView.of(image.astype(np.uint8), detect=True)


def test_camera_tile_compresses_the_raw_photograph_before_the_standardisation() -> None:
    image, fov = faint_stripes(160)
    window = whole_window(160, side=160)
    raw, standardised = kept(image, fov)
    reference = resample_image(standardised, window)
    inside = torch.from_numpy(fov.mask)

    def likeness(tile: torch.Tensor) -> float:
        return float(np.corrcoef(tile[1][inside].numpy(), reference[1][inside].numpy())[0, 1])

    fine, harsh = camera_tile(raw, window, Camera(95)), camera_tile(raw, window, Camera(20))
    # A camera's JPEG loses detail a few grey levels deep, which the standardisation then magnifies...
    assert likeness(harsh) < 0.6 and likeness(fine) > likeness(harsh) + 0.2
    # ...while compressing the standardised tile (the detail already magnified) keeps it.
    standardised = (reference * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert likeness(torch.from_numpy(jpeg_roundtrip(standardised, 20)).permute(2, 0, 1).float() / 255) > 0.9


def test_coarser_camera_pixels_soften_the_vessel() -> None:
    raw, _ = kept(*fundus())
    profile = lambda t: t[1, 120:200].mean(dim=0)  # noqa: E731
    fine = profile(camera_tile(raw, whole_window(SIDE), Camera(95)))
    coarse = profile(camera_tile(raw, whole_window(SIDE), Camera(95, coarseness=4.0)))
    middle = slice(SIDE // 2 - 2, SIDE // 2 + 2)
    # The vessel is shallower and wider: its darkest columns are less dark.
    assert float(coarse[middle].min()) > float(fine[middle].min()) + 0.05


def test_raw_photograph_kept_at_a_smaller_scale_stays_aligned() -> None:
    image, fov = fundus()
    full, _ = kept(image, fov)
    half, _ = kept(image, fov, 0.5)
    assert half.scale == 0.5 and half.image.shape == (SIDE // 2, SIDE // 2, 3)
    assert abs(half.fov.width - fov.width / 2) <= 1
    assert not half.image[~half.fov.mask].any()
    tile_full = camera_tile(full, whole_window(80), Camera(95))
    tile_kept = camera_tile(half, whole_window(80), Camera(95))
    assert np.corrcoef(tile_full[1].flatten().numpy(), tile_kept[1].flatten().numpy())[0, 1] > 0.9


def test_dataset_camera_tiles_keep_the_mask_aligned_and_repeat_with_the_seed(tmp_path: Path) -> None:
    image, inside = synthetic_fundus(SIDE, 3)
    mask = np.zeros((SIDE, SIDE), dtype=np.uint8)
    mask[:, SIDE // 2 - 2 : SIDE // 2 + 1] = 255  # the synthetic vessel's three columns
    mask[~inside] = 0
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(mask).save(tmp_path / "a_mask.png")
    sample = TaskSample(ImageItem(str(tmp_path / "a.png")), mask=str(tmp_path / "a_mask.png"))
    task = SegmentationTask()
    options = {**task.preprocess_defaults(), "fov_diameter": 0, "jitter": 0.0, "gamma": 0.0, "colour": 0.0,
               "blur": 0.0, "rotate": 0.0, "jpeg": 1.0, "camera_coarseness": 1.5}
    preprocess = Preprocess(image_size=64, fov_crop=True, **options)
    dataset = TaskDataset([sample], preprocess, task.prepare, train=True)
    torch.manual_seed(0)
    records = [dataset[i] for i in range(8)]
    torch.manual_seed(0)
    again = [dataset[i] for i in range(8)]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(records, again, strict=True))
    for record in records:
        vessel = record["mask"] == 1
        background = (record["mask"] == 0) & (record["image"][1] > -0.99)  # inside the field of view
        if int(vessel.sum()) < 20 or int(background.sum()) < 50:
            continue
        green = record["image"][1]
        assert float(green[vessel].mean()) < float(green[background].mean()) - 0.15
    # Without the option no tile is compressed: the same draws give the lossless tiles.
    lossless = TaskDataset([sample], Preprocess(image_size=64, fov_crop=True, **{**options, "jpeg": 0.0}),
                           task.prepare, train=True)
    torch.manual_seed(0)
    plain = lossless[0]
    image_std, _ = lossless.load(0)
    window = Window.from_tensor(plain["window"])
    expected = preprocess.normalise(resample_image(image_std, window), train=False)
    assert torch.equal(plain["image"], expected)


def test_preprocess_checks_the_camera_options_and_old_metadata_loads() -> None:
    with pytest.raises(ConfigError, match="jpeg"):
        Preprocess(jpeg=1.5)
    with pytest.raises(ConfigError, match="jpeg_quality"):
        Preprocess(jpeg_quality=(90, 40))
    with pytest.raises(ConfigError, match="camera_coarseness"):
        Preprocess(camera_coarseness=0.5)
    old = Preprocess().to_dict()
    del old["jpeg"], old["jpeg_quality"], old["camera_coarseness"]
    assert Preprocess.from_dict(old).jpeg == 0.0
    saved = {**Preprocess(jpeg=0.5).to_dict(), "jpeg_quality": [30, 90]}  # as JSON gives it back
    assert Preprocess.from_dict(saved).jpeg_quality == (30, 90)
    assert Preprocess(jpeg_quality=[50, 95]).jpeg_quality == (50, 95)  # type: ignore[arg-type]  # JSON override


class CountingItem(ImageItem):
    """A real image item that counts its decodes."""

    decodes = 0

    def load(self) -> np.ndarray:
        CountingItem.decodes += 1
        return super().load()


def test_camera_tiles_beyond_the_cache_decode_each_photograph_once_per_tile(tmp_path: Path) -> None:
    image, _ = synthetic_fundus(SIDE, 3)
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((SIDE, SIDE), dtype=np.uint8)).save(tmp_path / "a_mask.png")
    sample = TaskSample(CountingItem(str(tmp_path / "a.png")), mask=str(tmp_path / "a_mask.png"))
    task = SegmentationTask()
    options = {**task.preprocess_defaults(), "fov_diameter": 0, "rotate": 0.0, "jpeg": 1.0}
    preprocess = Preprocess(image_size=64, fov_crop=True, **options)
    cached = TaskDataset([sample], preprocess, task.prepare, train=True)
    uncached = TaskDataset([sample], preprocess, task.prepare, train=True, keep_decoded=0)
    torch.manual_seed(0)
    expected = [cached[0]["image"] for _ in range(3)]
    CountingItem.decodes = 0
    torch.manual_seed(0)
    tiles = [uncached[0]["image"] for _ in range(3)]
    # One decode per tile (not one for the lossless image and one more for the camera's raw crop),
    # and the tiles are the ones the cached dataset cuts with the same draws.
    assert CountingItem.decodes == 3
    assert all(torch.equal(a, b) for a, b in zip(tiles, expected, strict=True))
