"""Training tiles as another camera would deliver them: fewer pixels and JPEG compression.

Other cameras store their photographs as JPEG, often with fewer pixels across the field of view
than the working scale, and the product standardises what it is given
(:func:`~visionfm_core.data.preprocess_contrast.local_contrast`) before the network sees it. So
the compression has to be simulated on the *raw* photograph, before the standardisation: that
amplifies each neighbourhood's contrast several times, JPEG's block and ringing errors with it
(most in the dim blue and red channels), which is what a model trained on lossless photographs
has never seen. Compressing the standardised tile instead degrades it far more gently than a
camera does.

:func:`camera_tile` cuts a training window from the raw photograph (:class:`RawPhotograph`, black
outside its field of view) at ``coarseness`` times fewer pixels than the tile (the camera's
resolution), round-trips it through Pillow's JPEG codec in memory, brings it up to the tile and
standardises it with the neighbourhood statistics of the whole lossless photograph, the ones its
lossless tiles get: a camera tile differs from the lossless one by the compression (and pixel size)
only. Standardising the crop on its own instead (statistics at the tile's resolution, from the
crop) changed even a near-lossless tile by 4 to 8 grey levels on average on HRF, about as much as
JPEG quality 75 itself. The window is unchanged, so the mask and field of view stay aligned.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from visionfm_core.data.preprocess import mask_box
from visionfm_core.data.preprocess_contrast import LocalStatistics
from visionfm_core.tasks.geometry import Window, resample_image, resample_inside
from visionfm_core.tasks.tiles import FieldOfView


@dataclass(frozen=True)
class Camera:
    """One simulated camera: JPEG ``quality`` (1-95) and pixels ``coarseness`` times larger than the tile's."""

    quality: int
    coarseness: float = 1.0


def draw_camera(probability: float, quality: tuple[int, int], max_coarseness: float) -> Camera | None:
    """A random camera for one training tile with ``probability`` (None: the tile stays lossless):
    quality uniform in ``quality`` (inclusive), coarseness log-uniform in [1, ``max_coarseness``].
    Draws from torch's global generator (seeded with the run), and none at all when ``probability``
    is 0, so a run without the augmentation draws exactly the tiles it drew before."""
    if probability <= 0:
        return None
    draws = torch.rand(3).tolist()
    if draws[0] >= probability:
        return None
    low, high = quality
    chosen = min(high, low + int(draws[1] * (high - low + 1)))
    return Camera(chosen, math.exp(draws[2] * math.log(max(1.0, max_coarseness))))


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """(H, W, 3) uint8 -> the same after JPEG encoding at ``quality`` and decoding (Pillow's
    defaults otherwise: 4:2:0 chroma subsampling, as most cameras store)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.array(decoded.convert("RGB"))  # writable: torch wraps it later


@dataclass(frozen=True)
class RawPhotograph:
    """A photograph before the standardisation, black outside its field of view, kept at ``scale`` of
    its source resolution (a 15-megapixel photograph need not be kept whole for tiles of a fraction of
    its resolution), with its field of view at that scale and the neighbourhood ``statistics`` of the
    whole photograph at its source resolution (None: tiles are not standardised)."""

    image: np.ndarray
    fov: FieldOfView
    scale: float
    statistics: LocalStatistics | None = None

    @classmethod
    def keep(
        cls, image: np.ndarray, fov: FieldOfView, finest: float, statistics: LocalStatistics | None = None
    ) -> RawPhotograph:
        """``image`` (H, W, 3) uint8 at ``finest`` of its resolution, or as it is when that is finer."""
        scale = min(1.0, finest)
        height, width = image.shape[:2]
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        if scale >= 1.0 or size == (height, width):
            return cls(image, fov, 1.0, statistics)
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None]
        small = F.interpolate(pixels, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        kept = small.round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        inside = Image.fromarray(fov.mask.astype(np.uint8) * 255).resize(size[::-1], Image.Resampling.BOX)
        mask = np.asarray(inside) >= 128
        kept = kept * mask[..., None]
        return cls(kept, FieldOfView(mask, mask_box(mask)), size[1] / width, statistics)


def camera_tile(raw: RawPhotograph, window: Window, camera: Camera) -> Tensor:
    """The (3, size, size) float tile in [0, 1] of ``window`` (source pixels of the photograph) as
    ``camera`` would deliver it: the raw crop at ``1 / coarseness`` of the tile's resolution, JPEG
    at the camera's quality, brought up to the tile, then standardised with the whole photograph's
    neighbourhood statistics (as its lossless tiles are, so the compression is all that differs),
    black outside the field of view. Square windows only (tiles are square).
    """
    size = window.size
    pixels = max(8, round(size / max(1.0, camera.coarseness)))
    # In kept pixels, unmirrored: the tile is mirrored at the end, as resample_image does.
    shot = Window(window.x0 * raw.scale, window.y0 * raw.scale, window.side * raw.scale, pixels)
    crop = (resample_image(raw.image, shot) * 255).round_().to(torch.uint8).permute(1, 2, 0).numpy()
    crop = jpeg_roundtrip(np.ascontiguousarray(crop), camera.quality)
    tile = torch.from_numpy(crop).permute(2, 0, 1).float().div_(255.0)
    if pixels != size:
        tile = F.interpolate(tile[None], size=(size, size), mode="bilinear", align_corners=False)[0].clamp_(0, 1)
    at_tile = Window(shot.x0, shot.y0, shot.side, size)
    inside = resample_inside(raw.fov.mask, at_tile)
    if raw.statistics is not None:
        planes = raw.statistics.sample(window.y0, window.x0, 1.0 / window.scale, size, size)
        standardised = raw.statistics.standardise(tile, planes, inside.float())
        tile = torch.from_numpy(standardised).permute(2, 0, 1).float().div_(255.0)
    else:
        tile = tile * inside
    return tile.flip(-1) if window.flip else tile
