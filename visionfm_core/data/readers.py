"""Decode one image file into an RGB uint8 array; every failure is a DataError naming the file.

8- and 16-bit images are scaled to 8 bit, grayscale is repeated to three channels and EXIF
orientation is applied, so every reader hands the transforms the same (H, W, 3) uint8 layout.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from visionfm_core.errors import DataError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif"})
# Refuse decompression bombs: 2x Pillow's warning threshold is far above any ophthalmic photograph.
MAX_PIXELS = 2 * 89_478_485


def to_rgb_uint8(array: np.ndarray, source: str = "<array>") -> np.ndarray:
    """Bring a 2-D or 3-D array of any integer or float depth to (H, W, 3) uint8."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or min(array.shape[:2]) == 0:
        raise DataError(source, f"unsupported image shape {tuple(array.shape)}")
    if array.shape[2] == 4:
        array = array[:, :, :3]
    if array.dtype != np.uint8:
        values = array.astype(np.float32)
        if not np.isfinite(values).all():
            raise DataError(source, "image contains NaN or infinite values")
        if np.issubdtype(array.dtype, np.integer) and values.max(initial=0) > 255:
            # 16-bit (or 12-bit in 16) data: scale by the type's range, not by this image's maximum,
            # so brightness stays comparable between images.
            top = 65535.0 if values.max() > 4095 else 4095.0
            values = values / top * 255.0
        elif np.issubdtype(array.dtype, np.floating) and values.max(initial=0) <= 1.0:
            values = values * 255.0
        array = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array)


def read_image(path: str | Path) -> np.ndarray:
    """Read a png/jpeg/tiff/bmp/gif file as (H, W, 3) uint8; raise DataError(path, reason) on failure."""
    name = str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise DataError(name, f"image too large ({image.width}x{image.height} pixels)")
                image = ImageOps.exif_transpose(image)
                if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                    array = np.asarray(image, dtype=np.int32)
                elif image.mode in ("RGB", "L"):
                    array = np.asarray(image)
                elif image.mode == "F":
                    array = np.asarray(image, dtype=np.float32)
                else:
                    array = np.asarray(image.convert("RGB"))
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(name, "file not found") from exc
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(name, f"not a readable image ({type(exc).__name__})") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise DataError(name, f"corrupt or truncated image ({type(exc).__name__}: {exc})") from exc
    if array.size == 0:
        raise DataError(name, "empty image")
    return to_rgb_uint8(array, name)
