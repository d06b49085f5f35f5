"""Tell what a file holds from its first bytes, not its name: PACS exports often have no extension,
and a mislabelled extension must neither hide a good image nor let a bad one through."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

# Files that sit beside images and are never images; they are ignored, not reported.
SIDECAR_SUFFIXES = frozenset(
    {
        ".csv",
        ".tsv",
        ".txt",
        ".json",
        ".md",
        ".toml",
        ".yaml",
        ".yml",
        ".xml",
        ".html",
        ".htm",
        ".pdf",
        ".ini",
        ".log",
        ".sqlite",
        ".db",
    }
)
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic"})

_IMAGE_MAGIC: tuple[bytes, ...] = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",  # JPEG
    b"II*\x00",
    b"MM\x00*",  # TIFF
    b"BM",  # BMP
    b"GIF87a",
    b"GIF89a",
    b"\x00\x00\x00\x0cjP  \r\n\x87\n",
    b"\xff\x4f\xff\x51",  # JPEG 2000 (jp2 box, raw codestream)
)


def is_netpbm(head: bytes) -> bool:
    """Netpbm (.pbm/.pgm/.ppm/.pnm, e.g. STARE's photographs): "P1".."P6" then whitespace."""
    return len(head) >= 3 and head[:1] == b"P" and head[1:2] in b"123456" and head[2:3] in b" \t\r\n"


class FileType(str, Enum):
    """What the first bytes say a file is."""

    DICOM = "dicom"
    IMAGE = "image"
    VENDOR_OCT = "vendor_oct"  # Topcon .fda/.fds, Heidelberg .e2e (vendor_oct.py)
    EMPTY = "empty"
    UNKNOWN = "unknown"


def sniff_bytes(head: bytes, suffix: str = "") -> FileType:
    """Classify from the first 132 bytes (the DICOM magic sits at offset 128)."""
    if not head:
        return FileType.EMPTY
    if len(head) >= 132 and head[128:132] == b"DICM":
        return FileType.DICOM
    if any(head.startswith(magic) for magic in _IMAGE_MAGIC):
        return FileType.IMAGE
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return FileType.IMAGE
    if is_netpbm(head):
        return FileType.IMAGE
    from visionfm_core.data.vendor_oct import vendor_format

    if vendor_format(head) is not None:
        return FileType.VENDOR_OCT
    # Old DICOM files may lack the preamble; trust the extension then and let the reader decide.
    if suffix.lower() in DICOM_SUFFIXES:
        return FileType.DICOM
    return FileType.UNKNOWN


def sniff_file(path: str | Path) -> FileType:
    """Classify a file by content; raises OSError if it cannot be opened."""
    with open(path, "rb") as handle:
        head = handle.read(132)
    return sniff_bytes(head, Path(path).suffix)
