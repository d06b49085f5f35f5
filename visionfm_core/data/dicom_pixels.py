"""Decode one frame of a DICOM image into (H, W, 3) uint8, the layout every reader hands on.

Order of operations follows the DICOM display pipeline: decode (pydicom interleaves planar layouts
and upsamples 4:2:2 chroma), YBR to RGB, palette lookup, modality LUT (rescale slope/intercept),
VOI LUT or window, MONOCHROME1 inversion, then scaling to 8 bit. Only the requested frame is
decoded, so an OCT volume is read one B-scan at a time.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder, pixel_array
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut, convert_color_space
from pydicom.uid import JPEGBaseline8Bit

from visionfm_core.data.dicom_header import DicomHeader, read_dicom_header
from visionfm_core.data.problems import DataFileError, ProblemKind
from visionfm_core.data.readers import to_rgb_uint8

# Tags outside the Image Pixel module that the display pipeline needs: rescale, modality and VOI
# LUTs, windows, and (segmented) palette tables.
_PIPELINE_TAGS = [
    0x00281050,
    0x00281051,
    0x00281052,
    0x00281053,
    0x00281054,
    0x00281056,
    0x00283000,
    0x00283010,
    0x00281101,
    0x00281102,
    0x00281103,
    0x00281199,
    0x00281201,
    0x00281202,
    0x00281203,
    0x00281221,
    0x00281222,
    0x00281223,
]


def _preferred_plugin(syntax: str) -> str:
    # For 8-bit JPEG, Pillow (libjpeg-turbo) is several times faster than the optional pylibjpeg.
    if syntax == JPEGBaseline8Bit and "pillow" in get_decoder(JPEGBaseline8Bit).available_plugins:
        return "pillow"
    return ""


def _decode_frame(path: str | Path, frame: int, syntax: str) -> tuple[np.ndarray, Dataset]:
    """The decoded frame, colour left in its stored space (YBR stays YBR: converting in Pillow's C code
    below is much faster than pydicom's numpy conversion), plus the elements describing it."""
    ds_out = Dataset()
    try:
        # Reads only this frame's bytes: the cheap path for volumes.
        array = pixel_array(
            path,
            index=frame,
            ds_out=ds_out,
            specific_tags=_PIPELINE_TAGS,
            as_rgb=False,
            decoding_plugin=_preferred_plugin(syntax),
        )
        return array, ds_out
    except Exception:  # some valid files trip the streaming parser; retry on the full dataset
        ds = dcmread(path, force=True)
        return pixel_array(ds, index=frame, as_rgb=False), ds


def _value(ds: Dataset, key: str, default: float) -> float:
    value = ds.get(key)
    try:
        return float(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if not high > low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _bits_stored(ds: Dataset, array: np.ndarray) -> int:
    default = 8 * array.dtype.itemsize
    return int(_value(ds, "BitsStored", default)) or default


def _monochrome(array: np.ndarray, ds: Dataset) -> np.ndarray:
    has_rescale = "ModalityLUTSequence" in ds or (
        _value(ds, "RescaleSlope", 1.0),
        _value(ds, "RescaleIntercept", 0.0),
    ) != (1.0, 0.0)
    values: np.ndarray = apply_modality_lut(array, ds) if has_rescale else array
    if "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds, index=0, prefer_lut=True)
        descriptor = ds.VOILUTSequence[0].LUTDescriptor
        low, high = 0.0, float(2 ** int(descriptor[2]) - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        # Apply the first window ourselves so the output range is exactly the window.
        center = _value_first(ds, "WindowCenter")
        width = max(_value_first(ds, "WindowWidth"), 1.0)
        low, high = center - width / 2.0, center + width / 2.0
    elif not has_rescale and int(_value(ds, "PixelRepresentation", 0)) == 0 and array.dtype.kind in "ub":
        # Unsigned stored values: scale by the stored bit depth so brightness is comparable between
        # images (a 12-bit OCT keeps its 0..4095 scale).
        low, high = 0.0, float(2 ** _bits_stored(ds, array) - 1)
    else:
        # Signed, rescaled or float data without a window has no standard display range.
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            raise DataFileError("", ProblemKind.CORRUPT, "frame has no finite pixel values")
        low, high = float(finite.min()), float(finite.max())
    result = _scale(np.nan_to_num(values, nan=low), low, high)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        result = 255 - result  # MONOCHROME1: low values are white
    return result


def _value_first(ds: Dataset, key: str) -> float:
    value = ds[key].value
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _colour(array: np.ndarray, ds: Dataset) -> np.ndarray:
    if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
        array = apply_color_lut(array, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return _scale(array, 0.0, float(2 ** (16 if bits > 8 else 8) - 1))
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric in ("YBR_FULL", "YBR_FULL_422"):
        if array.dtype == np.uint8:
            return np.asarray(Image.fromarray(np.ascontiguousarray(array), mode="YCbCr").convert("RGB"))
        array = convert_color_space(array, photometric, "RGB")
    if array.dtype == np.uint8:
        return array
    return _scale(array, 0.0, float(2 ** _bits_stored(ds, array) - 1))


def read_dicom_frame(path: str | Path, frame: int = 0, header: DicomHeader | None = None) -> np.ndarray:
    """Frame `frame` of a DICOM image file as (H, W, 3) uint8.

    The header is validated first (size limits, transfer syntax, truncation) unless the caller passes
    one it has already read; any failure is a DataFileError naming the file and the reason.
    """
    name = str(path)
    if header is None:
        header = read_dicom_header(path)
    if not 0 <= frame < header.frames:
        raise DataFileError(name, ProblemKind.OTHER, f"frame {frame} out of range (file has {header.frames})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warnings can quote element values
            array, ds = _decode_frame(path, frame, header.transfer_syntax)
            if (array.ndim == 3 and array.shape[-1] == 3) or header.photometric == "PALETTE COLOR":
                image = _colour(array, ds)
            else:
                image = _monochrome(array, ds)
    except DataFileError as exc:
        raise DataFileError(name, exc.kind, exc.reason) from exc
    except (MemoryError, EOFError) as exc:
        raise DataFileError(
            name,
            ProblemKind.TRUNCATED if isinstance(exc, EOFError) else ProblemKind.TOO_LARGE,
            f"cannot decode pixel data ({type(exc).__name__})",
        ) from exc
    except Exception as exc:  # decoders raise many types on corrupt streams; a bad file must not stop a run
        reason = str(exc).splitlines()[0][:160] if str(exc) else ""
        kind = (
            ProblemKind.TRUNCATED
            if "less than expected" in reason or "truncat" in reason
            else ProblemKind.CORRUPT
        )
        raise DataFileError(name, kind, f"cannot decode pixel data ({type(exc).__name__}: {reason})") from exc
    if image.shape[:2] != (header.rows, header.columns):
        raise DataFileError(
            name,
            ProblemKind.CORRUPT,
            f"decoded shape {image.shape} does not match the header {header.rows}x{header.columns}",
        )
    return to_rgb_uint8(image, name)
