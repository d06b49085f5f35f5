"""One entry point to decode any site file (image or DICOM frame), chosen by content, not by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from visionfm_core.data.problems import DataFileError, ProblemKind
from visionfm_core.data.sniff import FileType, sniff_file


def read_any_image(path: str | Path, frame: int | None = None) -> np.ndarray:
    """Decode an image file, or frame `frame` (default 0) of a DICOM file, as (H, W, 3) uint8.

    Raises DataFileError naming the file; a file whose extension lies about its content is read by
    what it really is, and one that is neither an image nor DICOM is refused.
    """
    name = str(path)
    try:
        kind = sniff_file(path)
    except FileNotFoundError as exc:
        raise DataFileError(name, ProblemKind.FILE_NOT_FOUND, "file not found") from exc
    except OSError as exc:
        raise DataFileError(name, ProblemKind.OTHER, f"cannot open file ({type(exc).__name__})") from exc
    if kind is FileType.EMPTY:
        raise DataFileError(name, ProblemKind.EMPTY, "empty file (0 bytes)")
    if kind is FileType.DICOM:
        from visionfm_core.data.dicom_pixels import read_dicom_frame

        return read_dicom_frame(path, 0 if frame is None else frame)
    if kind is FileType.VENDOR_OCT:
        from visionfm_core.data.vendor_oct import read_vendor_frame, sniff_vendor_file

        return read_vendor_frame(path, sniff_vendor_file(path), frame)
    if kind is FileType.IMAGE:
        if frame not in (None, 0):
            raise DataFileError(name, ProblemKind.OTHER, f"frame {frame} requested from a single-frame image")
        from visionfm_core.data.readers import read_image

        return read_image(path)
    suffix = Path(path).suffix or "(none)"
    raise DataFileError(
        name, ProblemKind.NOT_AN_IMAGE,
        f"content is neither a supported image, DICOM nor a vendor OCT export (extension {suffix})",
    )
