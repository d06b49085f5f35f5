"""Modality preprocessing as plain functions on (H, W, 3) uint8 arrays, so any task's transforms can
call them: fundus field-of-view crop, OCT B-scan intensity normalisation, aspect-preserving resize."""

from __future__ import annotations

import numpy as np
from PIL import Image

from visionfm_core.errors import ConfigError


def _check_rgb(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) == 0:
        raise ConfigError(
            "image", f"expected a non-empty (H, W, 3) uint8 array, got {image.dtype} {image.shape}"
        )


def fundus_fov_mask(image: np.ndarray, threshold: int | None = None) -> np.ndarray:
    """Boolean (H, W) mask of the circular field of view of a fundus photograph.

    The border of a fundus camera image is near black but noisy after JPEG; a pixel is inside when its
    brightest channel exceeds `threshold` (default: :func:`fov_threshold`).
    """
    _check_rgb(image)
    brightest = image.max(axis=2)
    if threshold is None:
        threshold = fov_threshold(brightest)
    return brightest > threshold


# A border at least this bright (of 255) is a lifted one (a grey surround, an export with raised
# blacks): the threshold then starts from it. Below it, JPEG specks on black, the border counts as 0.
LIFTED_BORDER = 8
# A corner brighter than this share of the 99th percentile is retina, not border: no border at all.
BORDER_SHARE = 0.25


def fov_threshold(brightest: np.ndarray) -> int:
    """The field-of-view threshold of an (H, W) brightest-channel image: 7% of the way from the
    border's level to the 99th percentile, at least 10. The border's level is the median of the four
    corners (outside the circle on fundus cameras); a lifted grey border would otherwise pass a
    threshold set from black, and the whole frame would count as field of view."""
    top = float(np.percentile(brightest, 99))
    height, width = brightest.shape
    ch, cw = max(1, height // 20), max(1, width // 20)
    corners = np.concatenate([brightest[:ch, :cw].ravel(), brightest[:ch, -cw:].ravel(),
                              brightest[-ch:, :cw].ravel(), brightest[-ch:, -cw:].ravel()])
    level = float(np.median(corners))
    if level < LIFTED_BORDER or level > BORDER_SHARE * top:
        level = 0.0
    return max(10, int(level + 0.07 * (top - level)))


# Long side of the thumbnail the fast field-of-view finder thresholds (a 15-megapixel photograph is
# strided down about 20 times: its circle edge is then placed to within that stride, plenty for cropping).
FOV_THUMBNAIL = 256


def fast_fundus_fov(image: np.ndarray, thumbnail: int = FOV_THUMBNAIL) -> np.ndarray:
    """Boolean (H, W) field-of-view mask found on a strided thumbnail (milliseconds at 15 megapixels).

    The thumbnail's brightest channel is thresholded like :func:`fundus_fov_mask` (:func:`fov_threshold`:
    a lifted grey border is measured in the corners and stays outside); each row is then
    filled between its first and last inside pixel (the field of view is convex, so dark lesions,
    vessels or a dim macula inside it never become holes), and the mask is brought back to full size
    with nearest-neighbour. An image without a dark border gives an all-true mask.
    """
    _check_rgb(image)
    height, width = image.shape[:2]
    stride = max(1, int(np.ceil(max(height, width) / thumbnail)))
    small = image[::stride, ::stride].max(axis=2)
    inside = small > fov_threshold(small)
    # Row-span fill: from the first to the last inside pixel of every row with enough of them.
    counts = inside.sum(axis=1)
    filled = np.zeros_like(inside)
    columns = np.arange(inside.shape[1])
    for row in np.flatnonzero(counts > max(1, 0.01 * inside.shape[1])):
        hits = np.flatnonzero(inside[row])
        filled[row] = (columns >= hits[0]) & (columns <= hits[-1])
    if not filled.any():
        return np.ones((height, width), dtype=bool)
    # Nearest-neighbour back to full size: thumbnail pixel (i, j) covers rows i*stride.. of the source.
    rows = np.minimum(np.arange(height) // stride, filled.shape[0] - 1)
    cols = np.minimum(np.arange(width) // stride, filled.shape[1] - 1)
    full: np.ndarray = filled[rows][:, cols]
    return full


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a boolean mask's true pixels, bottom/right exclusive; the whole
    mask when none is true."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return 0, mask.shape[0], 0, mask.shape[1]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def fundus_fov_box(image: np.ndarray, threshold: int | None = None) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), bottom/right exclusive, of the field of view; the whole image when
    no dark border is found. Rows/columns with fewer than 1% FOV pixels count as border (JPEG specks)."""
    mask = fundus_fov_mask(image, threshold)
    height, width = mask.shape
    rows = np.flatnonzero(mask.sum(axis=1) > 0.01 * width)
    cols = np.flatnonzero(mask.sum(axis=0) > 0.01 * height)
    if rows.size == 0 or cols.size == 0:
        return 0, height, 0, width
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def crop_fundus_fov(
    image: np.ndarray, threshold: int | None = None, square: bool = True, blank_outside: bool = False
) -> np.ndarray:
    """Crop a fundus photograph to its field of view, dropping black borders.

    `square` pads the crop with black to a square centred on the field of view (the circle stays
    round after a later square resize, also when the camera cut it at the top and bottom);
    `blank_outside` sets pixels outside the FOV mask to black (removes glare and text overlays).
    """
    mask = fundus_fov_mask(image, threshold)
    top, bottom, left, right = fundus_fov_box(image, threshold)
    crop = image[top:bottom, left:right]
    if blank_outside:
        crop = np.where(mask[top:bottom, left:right, None], crop, np.uint8(0))
    if square:
        crop = pad_to_square(crop)
    return np.ascontiguousarray(crop)


def pad_to_square(image: np.ndarray, fill: int = 0) -> np.ndarray:
    """Pad the shorter side symmetrically with `fill` so height == width."""
    _check_rgb(image)
    height, width = image.shape[:2]
    side = max(height, width)
    out = np.full((side, side, 3), fill, dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    out[top : top + height, left : left + width] = image
    return out


def normalise_oct_bscan(
    image: np.ndarray, low_percentile: float = 1.0, high_percentile: float = 99.5
) -> np.ndarray:
    """Stretch an OCT B-scan's intensities so the given percentiles map to 0 and 255.

    Devices differ in gain and speckle level; percentiles (not min/max) keep a few saturated pixels
    from compressing the retina's range. The output is grey, repeated to three channels.
    """
    _check_rgb(image)
    if not 0.0 <= low_percentile < high_percentile <= 100.0:
        raise ConfigError(
            "percentiles", f"need 0 <= low < high <= 100, got {low_percentile}, {high_percentile}"
        )
    grey = image.astype(np.float32).mean(axis=2)
    low, high = np.percentile(grey, [low_percentile, high_percentile])
    # A flat image has nothing to stretch.
    stretched = grey if high - low < 1.0 else (grey - low) * (255.0 / (high - low))
    out = np.clip(np.rint(stretched), 0, 255).astype(np.uint8)
    return np.repeat(out[:, :, None], 3, axis=2)


def resize_keep_aspect(image: np.ndarray, size: int, pad: bool = True, fill: int = 0) -> np.ndarray:
    """Resize so the longer side is `size` (antialiased); with `pad`, centre it on a size x size canvas."""
    _check_rgb(image)
    if size <= 0:
        raise ConfigError("size", f"must be positive, got {size}")
    height, width = image.shape[:2]
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    resized = np.asarray(
        Image.fromarray(image).resize(
            (new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=3.0 if scale < 1 else None
        )
    )
    if not pad:
        return resized
    out = np.full((size, size, 3), fill, dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out
