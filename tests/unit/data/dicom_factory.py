"""Build ophthalmic DICOM files (OP, OPT, secondary capture) from real sample images for the tests.

No real ophthalmic DICOM file is openly available, so the tests wrap the bundled fundus and OCT
images in the DICOM objects a device would write, compressed or not, and compare decoded pixels.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

import simulations

DATA = Path(simulations.__file__).parent / "data"
OP_8BIT = UID("1.2.840.10008.5.1.4.1.1.77.1.5.1")
OP_16BIT = UID("1.2.840.10008.5.1.4.1.1.77.1.5.2")
OPT = UID("1.2.840.10008.5.1.4.1.1.77.1.5.4")
SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")


def fundus_rgb(name: str = "01_h", size: tuple[int, int] | None = (96, 64)) -> np.ndarray:
    """A real HRF fundus photograph as (H, W, 3) uint8, shrunk to `size` (W, H) to keep tests fast."""
    with Image.open(DATA / "hrf" / "images" / f"{name}.jpg") as image:
        if size:
            image.draft("RGB", (size[0] * 2, size[1] * 2))  # decode at reduced scale: much faster
        rgb = image.convert("RGB")
        return np.asarray(rgb.resize(size) if size else rgb)


def oct_volume(count: int = 5, size: tuple[int, int] = (64, 62)) -> np.ndarray:
    """`count` real OCT2017 B-scans (grey, uint8) stacked as (frames, H, W)."""
    files = sorted((DATA / "oct2017_val" / "val").rglob("*.jpeg"))[:count]
    return np.stack([np.asarray(Image.open(f).convert("L").resize(size)) for f in files])


def _base(sop_class: UID, modality: str, syntax: UID, patient_id: str, laterality: str | None) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.PatientName = "Test^Synthetic"
    if laterality:
        ds.ImageLaterality = laterality
    return ds


def _pixel_module(ds: Dataset, frames: np.ndarray, photometric: str, bits_stored: int) -> None:
    multi = frames.ndim == (4 if photometric != "MONOCHROME2" and photometric != "MONOCHROME1" else 3)
    shape = frames.shape[1:] if multi else frames.shape
    ds.Rows, ds.Columns = int(shape[0]), int(shape[1])
    ds.SamplesPerPixel = (
        3 if frames.shape[-1] == 3 and photometric not in ("MONOCHROME1", "MONOCHROME2") else 1
    )
    ds.PhotometricInterpretation = photometric
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8 if frames.dtype == np.uint8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if multi:
        ds.NumberOfFrames = int(frames.shape[0])


def write_native(
    path: Path,
    frames: np.ndarray,
    *,
    sop_class: UID = OP_8BIT,
    modality: str = "OP",
    photometric: str = "RGB",
    bits_stored: int | None = None,
    patient_id: str = "PAT-001",
    laterality: str | None = "R",
    extra: dict[str, Any] | None = None,
) -> Path:
    """An uncompressed file; `frames` is (H, W[, 3]) or (N, H, W[, 3]) uint8/uint16."""
    ds = _base(sop_class, modality, ExplicitVRLittleEndian, patient_id, laterality)
    _pixel_module(ds, frames, photometric, bits_stored or 8 * frames.dtype.itemsize)
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_rle(path: Path, frames: np.ndarray, **kwargs: Any) -> Path:
    """RLE Lossless, encoded by pydicom itself."""
    write_native(path, frames, **kwargs)
    from pydicom import dcmread

    ds = dcmread(path)
    ds.compress(RLELossless, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return path


def _encode(frame: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    image = Image.fromarray(frame)
    if fmt == "jpeg":
        image.save(out, format="JPEG", quality=95, subsampling="4:2:2" if frame.ndim == 3 else 0)
    else:
        image.save(out, format="JPEG2000", irreversible=False, no_jp2=True)
    return out.getvalue()


def write_encapsulated(
    path: Path,
    frames: Sequence[np.ndarray],
    fmt: str,
    *,
    sop_class: UID = OP_8BIT,
    modality: str = "OP",
    patient_id: str = "PAT-001",
    laterality: str | None = "R",
) -> Path:
    """JPEG Baseline (`fmt="jpeg"`, lossy, YBR_FULL_422 for colour) or JPEG 2000 lossless (`"j2k"`)."""
    syntax = JPEGBaseline8Bit if fmt == "jpeg" else JPEG2000Lossless
    ds = _base(sop_class, modality, syntax, patient_id, laterality)
    colour = frames[0].ndim == 3
    photometric = ("YBR_FULL_422" if fmt == "jpeg" else "RGB") if colour else "MONOCHROME2"
    stack = np.stack(list(frames))
    _pixel_module(ds, stack if len(frames) > 1 else stack[0], photometric, 8)
    if len(frames) == 1 and "NumberOfFrames" in ds:
        del ds.NumberOfFrames
    ds.PixelData = encapsulate([_encode(f, fmt) for f in frames])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01" if fmt == "jpeg" else "00"
    ds.save_as(path, enforce_file_format=True)
    return path
