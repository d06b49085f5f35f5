"""Decode one image file into an RGB uint8 array; every failure is a DataFileError naming the file.

8- and 16-bit images are scaled to 8 bit, grayscale is repeated to three channels and EXIF
orientation is applied, so every reader hands the transforms the same (H, W, 3) uint8 layout.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from visionfm_core.data.problems import DataFileError, ProblemKind

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".pgm", ".pbm", ".pnm"}
)
# Refuse decompression bombs: 2x Pillow's warning threshold is far above any ophthalmic photograph.
MAX_PIXELS = 2 * 89_478_485


def to_rgb_uint8(array: np.ndarray, source: str = "<array>") -> np.ndarray:
    """Bring a 2-D or 3-D array of any integer or float depth to (H, W, 3) uint8."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or min(array.shape[:2]) == 0:
        raise DataFileError(
            source, ProblemKind.UNSUPPORTED_PIXEL_FORMAT, f"unsupported image shape {tuple(array.shape)}"
        )
    if array.shape[2] == 4:
        array = array[:, :, :3]
    if array.dtype != np.uint8:
        values = array.astype(np.float32)
        if not np.isfinite(values).all():
            raise DataFileError(
                source, ProblemKind.UNSUPPORTED_PIXEL_FORMAT, "image contains NaN or infinite values"
            )
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


def _pillow_array(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.asarray(image, dtype=np.int32)
    if image.mode in ("RGB", "L"):
        return np.asarray(image)
    if image.mode == "F":
        return np.asarray(image, dtype=np.float32)
    return np.asarray(image.convert("RGB"))


def read_image(path: str | Path) -> np.ndarray:
    """Read a png/jpeg/tiff/bmp/gif/Netpbm file as (H, W, 3) uint8; raise DataFileError(path, kind, reason)."""
    name = str(path)
    try:
        if Path(path).stat().st_size == 0:
            raise DataFileError(name, ProblemKind.EMPTY, "empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # Pillow's format warnings on damaged files: the error says enough
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                if opened.width * opened.height > MAX_PIXELS:
                    raise DataFileError(
                        name,
                        ProblemKind.TOO_LARGE,
                        f"image too large ({opened.width}x{opened.height} pixels)",
                    )
                array = _pillow_array(ImageOps.exif_transpose(opened))
    except DataFileError:
        raise
    except FileNotFoundError as exc:
        raise DataFileError(name, ProblemKind.FILE_NOT_FOUND, "file not found") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataFileError(
            name, ProblemKind.TOO_LARGE, "image too large (decompression bomb guard)"
        ) from exc
    except UnidentifiedImageError as exc:
        raise DataFileError(name, ProblemKind.NOT_AN_IMAGE, "not a readable image (unknown format)") from exc
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        kind = ProblemKind.TRUNCATED if "truncated" in str(exc).lower() else ProblemKind.CORRUPT
        raise DataFileError(name, kind, f"corrupt or truncated image ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:  # Pillow plugins raise assorted types on hostile input; none may crash a run.
        raise DataFileError(name, ProblemKind.CORRUPT, f"undecodable image ({type(exc).__name__})") from exc
    if array.size == 0:
        raise DataFileError(name, ProblemKind.CORRUPT, "empty image")
    return to_rgb_uint8(array, name)
