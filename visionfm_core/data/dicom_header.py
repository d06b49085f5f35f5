"""Read what the index needs from a DICOM file's header, never its pixels (`stop_before_pixels`), and
reject a file early when its pixels cannot be decoded: truncated, missing, too large, or in a transfer
syntax no installed decoder handles. Every failure is a DataFileError naming the file.
"""

from __future__ import annotations

import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGExtended12Bit,
)

from visionfm_core.data.patients import hash_patient_id
from visionfm_core.data.problems import DataFileError, ProblemKind

# One decoded frame may not exceed this many pixels: 8192 x 8192 is above any ophthalmic device, and
# the decode path holds a few float copies of a frame, so this bounds memory at a few GB.
MAX_FRAME_PIXELS = 8192 * 8192
# A cine loop or OCT volume has hundreds of frames; tens of thousands means a corrupt header.
MAX_FRAMES = 10_000

SUPPORTED_PHOTOMETRIC = frozenset(
    {
        "MONOCHROME1",
        "MONOCHROME2",
        "RGB",
        "YBR_FULL",
        "YBR_FULL_422",
        "YBR_ICT",
        "YBR_RCT",
        "PALETTE COLOR",
    }
)
_PIXEL_DATA_TAGS = frozenset({(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)})
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

# SOP classes whose modality is unambiguous, then the (0008,0060) Modality codes.
_SOP_CLASS_MODALITY = {
    "1.2.840.10008.5.1.4.1.1.77.1.5.1": "fundus",  # Ophthalmic Photography 8 bit
    "1.2.840.10008.5.1.4.1.1.77.1.5.2": "fundus",  # Ophthalmic Photography 16 bit
    "1.2.840.10008.5.1.4.1.1.77.1.5.4": "oct",  # Ophthalmic Tomography
    "1.2.840.10008.5.1.4.1.1.77.1.5.5": "fundus",  # Wide-field OP, stereographic projection
    "1.2.840.10008.5.1.4.1.1.77.1.5.6": "fundus",  # Wide-field OP, 3D coordinates
    "1.2.840.10008.5.1.4.1.1.77.1.5.7": "oct",  # OCT en face
    "1.2.840.10008.5.1.4.1.1.77.1.4": "external_eye",  # VL Photographic
    "1.2.840.10008.5.1.4.1.1.6.1": "ultrasound",
    "1.2.840.10008.5.1.4.1.1.3.1": "ultrasound",
    "1.2.840.10008.5.1.4.1.1.4": "mri",
    "1.2.840.10008.5.1.4.1.1.4.1": "mri",
}
_MODALITY_TAG = {"OP": "fundus", "OPT": "oct", "XC": "external_eye", "US": "ultrasound", "MR": "mri"}
# Ophthalmic photography and ultrasound each cover several VisionFM modalities; descriptions refine
# them (first match wins, most specific first).
_HINTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("ffa", re.compile(r"fluoresce|angiogra|\bffa\b|\bfa\b", re.I)),
    ("ubm", re.compile(r"\bubm\b|biomicroscop", re.I)),
    ("slit_lamp", re.compile(r"slit", re.I)),
    ("oct", re.compile(r"\boct\b|tomograph", re.I)),
    ("external_eye", re.compile(r"external|anterior segment photo", re.I)),
    ("fundus", re.compile(r"fundus|\bcfp\b|colou?r retina", re.I)),
)
_FAMILIES = ({"fundus", "ffa", "slit_lamp", "external_eye"}, {"ultrasound", "ubm"})


@dataclass(frozen=True)
class DicomHeader:
    """The facts about one DICOM image file that indexing and decoding need (no patient data:
    `patient_key` is the salted hash, or None without a salt or ID)."""

    sop_class_uid: str
    modality_tag: str
    transfer_syntax: str
    rows: int
    columns: int
    frames: int
    samples_per_pixel: int
    photometric: str
    bits_allocated: int
    laterality: str | None
    modality: str | None
    patient_key: str | None


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return " ".join(str(v) for v in value)
    return str(value)


def _hint_text(ds: Dataset) -> str:
    parts = [_text(ds.get(k)) for k in ("SeriesDescription", "StudyDescription", "ProtocolName", "ImageType")]
    for seq_name in ("AcquisitionDeviceTypeCodeSequence", "AnatomicRegionSequence"):
        for item in ds.get(seq_name) or []:
            parts.append(_text(item.get("CodeMeaning")))
    return " ".join(parts)


def detect_modality(ds: Dataset) -> str | None:
    """The VisionFM modality a DICOM header describes, or None when nothing says (e.g. a bare
    secondary capture); SOP class first, then the Modality tag, refined by descriptions."""
    sop = str(ds.get("SOPClassUID", ""))
    base = _SOP_CLASS_MODALITY.get(sop) or _MODALITY_TAG.get(str(ds.get("Modality", "")).upper())
    text = _hint_text(ds)
    hint = next((name for name, pattern in _HINTS if pattern.search(text)), None)
    if base is None:
        return hint
    if hint is not None and any(base in family and hint in family for family in _FAMILIES):
        return hint
    return base


def _laterality(ds: Dataset) -> str | None:
    for key in ("ImageLaterality", "Laterality"):
        value = str(ds.get(key, "") or "").strip().upper()
        if value:
            return value
    for group in ds.get("SharedFunctionalGroupsSequence") or []:
        for anatomy in group.get("FrameAnatomySequence") or []:
            value = str(anatomy.get("FrameLaterality", "") or "").strip().upper()
            if value:
                return value
    return None


def transfer_syntax_of(ds: Dataset) -> UID:
    """The file's transfer syntax, inferred from its encoding where the meta header lacks it."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return UID(str(meta.TransferSyntaxUID))
    encoding = getattr(ds, "original_encoding", (True, True))
    if encoding == (False, False):
        return ExplicitVRBigEndian
    return ImplicitVRLittleEndian if encoding[0] else ExplicitVRLittleEndian


def check_decodable(transfer_syntax: UID, name: str, bits_stored: int = 8) -> None:
    """Raise a DataFileError unless an installed decoder handles `transfer_syntax` at this bit depth."""
    from pydicom.pixels import get_decoder

    label = transfer_syntax.name if transfer_syntax.is_transfer_syntax else str(transfer_syntax)
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError as exc:
        raise DataFileError(
            name,
            ProblemKind.UNSUPPORTED_TRANSFER_SYNTAX,
            f"unsupported transfer syntax '{label}' (no DICOM decoder exists for it)",
        ) from exc
    # Pillow decodes only 8-bit JPEG: 12-bit JPEG Extended needs one of the optional decoders.
    pillow_only = set(decoder.available_plugins) <= {"pillow"}
    if not decoder.is_available or (transfer_syntax == JPEGExtended12Bit and bits_stored > 8 and pillow_only):
        raise DataFileError(
            name,
            ProblemKind.MISSING_CODEC,
            f"transfer syntax '{label}' needs an optional decoder: install visionfm-fed[dicom-codecs] "
            f"(pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle)",
        )


def _int(ds: Dataset, key: str, default: int) -> int:
    value = ds.get(key, default)
    try:
        return int(value if value not in (None, "") else default)
    except (TypeError, ValueError):
        return -1


def _expected_native_bytes(ds: Dataset) -> int:
    pixels = _int(ds, "Rows", 0) * _int(ds, "Columns", 0) * max(_int(ds, "NumberOfFrames", 1), 1)
    bits = _int(ds, "BitsAllocated", 8)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "YBR_FULL_422":
        return pixels * 2 * (bits // 8)  # two chroma samples shared by each pair of pixels
    pixels *= _int(ds, "SamplesPerPixel", 1)
    return (pixels + 7) // 8 if bits == 1 else pixels * (bits // 8)


def _check_pixel_element(handle: BinaryIO, ds: Dataset, syntax: UID, name: str, file_size: int) -> None:
    """After `stop_before_pixels` the file sits at the next element: it must be pixel data, and for an
    uncompressed syntax the file must hold all of the bytes the header promises."""
    start = handle.tell()
    head = handle.read(12)
    if len(head) < 8:
        # The header is complete but nothing follows: an image object written without its pixels
        # (a cut inside the pixel data is caught by the length check below).
        raise DataFileError(
            name, ProblemKind.MISSING_PIXEL_DATA, "no pixel data (file ends after the header)"
        )
    little = syntax != ExplicitVRBigEndian
    group, element = struct.unpack("<HH" if little else ">HH", head[:4])
    if (group, element) not in _PIXEL_DATA_TAGS:
        raise DataFileError(name, ProblemKind.MISSING_PIXEL_DATA, "no pixel data element")
    if syntax.is_encapsulated:
        if file_size - start < 24:
            raise DataFileError(name, ProblemKind.TRUNCATED, "compressed pixel data is cut off")
        return
    if syntax == ImplicitVRLittleEndian:
        (length,) = struct.unpack("<I", head[4:8])
        value_start = start + 8
    else:
        if len(head) < 12:
            raise DataFileError(name, ProblemKind.TRUNCATED, "file ends inside the pixel data header")
        (length,) = struct.unpack("<I" if little else ">I", head[8:12])
        value_start = start + 12
    expected = _expected_native_bytes(ds)
    available = file_size - value_start
    if length != 0xFFFFFFFF and length < expected:
        raise DataFileError(
            name, ProblemKind.TRUNCATED, f"pixel data holds {length} bytes, the header needs {expected}"
        )
    if available < expected:
        raise DataFileError(
            name,
            ProblemKind.TRUNCATED,
            f"file ends {expected - available} bytes before the end of the pixel data",
        )


def _validate_image_module(ds: Dataset, name: str) -> tuple[int, int, int, int, str, int]:
    if "Rows" not in ds or "Columns" not in ds:
        raise DataFileError(name, ProblemKind.MISSING_PIXEL_DATA, "not an image object (no Rows/Columns)")
    rows, columns = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    frames = _int(ds, "NumberOfFrames", 1)
    samples = _int(ds, "SamplesPerPixel", 1)
    bits = _int(ds, "BitsAllocated", 8)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if rows <= 0 or columns <= 0:
        raise DataFileError(name, ProblemKind.CORRUPT, f"invalid image size {rows}x{columns}")
    if rows * columns > MAX_FRAME_PIXELS:
        raise DataFileError(name, ProblemKind.TOO_LARGE, f"frame too large ({columns}x{rows} pixels)")
    if frames > MAX_FRAMES:
        raise DataFileError(name, ProblemKind.TOO_LARGE, f"too many frames ({frames})")
    if samples not in (1, 3) or bits not in (1, 8, 16, 32, 64):
        raise DataFileError(
            name,
            ProblemKind.UNSUPPORTED_PIXEL_FORMAT,
            f"unsupported layout ({samples} samples, {bits} bits allocated)",
        )
    if photometric not in SUPPORTED_PHOTOMETRIC:
        raise DataFileError(
            name,
            ProblemKind.UNSUPPORTED_PIXEL_FORMAT,
            f"unsupported photometric interpretation '{photometric}'",
        )
    return rows, columns, max(frames, 1), samples, photometric, bits


def read_dicom_header(path: str | Path, salt: bytes | None = None) -> DicomHeader:
    """Parse and validate a DICOM image file's header without touching its pixels.

    `salt` turns the PatientID into the site's patient key; the raw ID is dropped here.
    """
    name = str(path)
    has_magic = False
    try:
        file_size = Path(path).stat().st_size
        if file_size == 0:
            raise DataFileError(name, ProblemKind.EMPTY, "empty file (0 bytes)")
        with open(path, "rb") as handle, warnings.catch_warnings():
            has_magic = handle.read(132)[128:] == b"DICM"
            handle.seek(0)
            # pydicom warns with element values (which may be patient data): keep them out of logs.
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(handle, stop_before_pixels=True, force=True)
            if str(ds.get("SOPClassUID", "")) == _MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
                raise DataFileError(
                    name, ProblemKind.NOT_AN_IMAGE, "DICOMDIR (a directory index, not an image)"
                )
            if "SOPClassUID" not in ds and "Rows" not in ds:
                if has_magic and handle.tell() >= file_size:
                    raise DataFileError(name, ProblemKind.TRUNCATED, "file ends inside the DICOM header")
                raise DataFileError(name, ProblemKind.NOT_AN_IMAGE, "not a DICOM image file")
            syntax = transfer_syntax_of(ds)
            rows, columns, frames, samples, photometric, bits = _validate_image_module(ds, name)
            if syntax != DeflatedExplicitVRLittleEndian:  # positions inside a deflated stream mean nothing
                _check_pixel_element(handle, ds, syntax, name, file_size)
        check_decodable(syntax, name, _int(ds, "BitsStored", bits))
        patient_id = str(ds.get("PatientID", "") or "")
        return DicomHeader(
            sop_class_uid=str(ds.get("SOPClassUID", "")),
            modality_tag=str(ds.get("Modality", "") or ""),
            transfer_syntax=str(syntax),
            rows=rows,
            columns=columns,
            frames=frames,
            samples_per_pixel=samples,
            photometric=photometric,
            bits_allocated=bits,
            laterality=_laterality(ds),
            modality=detect_modality(ds),
            patient_key=hash_patient_id(patient_id, salt) if salt is not None else None,
        )
    except DataFileError:
        raise
    except FileNotFoundError as exc:
        raise DataFileError(name, ProblemKind.FILE_NOT_FOUND, "file not found") from exc
    except InvalidDicomError as exc:
        if has_magic:
            raise DataFileError(name, ProblemKind.CORRUPT, "DICOM header is damaged or cut off") from exc
        raise DataFileError(name, ProblemKind.NOT_AN_IMAGE, "not a DICOM file") from exc
    except (EOFError, struct.error) as exc:
        raise DataFileError(
            name, ProblemKind.TRUNCATED, f"DICOM header is cut off ({type(exc).__name__})"
        ) from exc
    except Exception as exc:  # pydicom raises many types on hostile headers; none may stop a site's run.
        raise DataFileError(
            name, ProblemKind.CORRUPT, f"unreadable DICOM header ({type(exc).__name__})"
        ) from exc
