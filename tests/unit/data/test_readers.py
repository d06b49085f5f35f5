"""Image files: real sample images decode to (H, W, 3) uint8; every bad file is one clear error."""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionfm_core.data.files import read_any_image
from visionfm_core.data.problems import DataFileError, ProblemKind
from visionfm_core.data.readers import read_image, to_rgb_uint8

from .dicom_factory import DATA, fundus_rgb, write_native

OCT_FILE = next((DATA / "oct2017_val" / "val" / "CNV").glob("*.jpeg"))
FUNDUS_FILE = DATA / "hrf" / "images" / "01_h.jpg"


def _problem(path: Path) -> DataFileError:
    with pytest.raises(DataFileError) as info:
        read_any_image(path)
    assert info.value.path == str(path)
    return info.value


def test_real_grayscale_oct_becomes_three_equal_channels() -> None:
    image = read_image(OCT_FILE)
    with Image.open(OCT_FILE) as source:
        grey = np.asarray(source.convert("L"))
    assert image.shape == (*grey.shape, 3) and image.dtype == np.uint8
    assert np.array_equal(image[:, :, 0], grey) and np.array_equal(image[:, :, 2], grey)


def test_real_fundus_matches_pillow_decode() -> None:
    with Image.open(FUNDUS_FILE) as source:
        expected = np.asarray(source.convert("RGB"))
    assert np.array_equal(read_image(FUNDUS_FILE), expected)


def test_sixteen_bit_png_scales_by_type_range(tmp_path: Path) -> None:
    values = (np.arange(64 * 32, dtype=np.uint32).reshape(32, 64) * 31).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    image = read_image(path)
    assert np.array_equal(image[:, :, 0], np.rint(values / 65535 * 255).astype(np.uint8))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    rgb = fundus_rgb(size=(48, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(rgb).save(path, quality=100, exif=exif.tobytes())
    image = read_image(path)
    assert image.shape == (48, 32, 3)
    expected = np.rot90(rgb, k=-1)
    assert np.abs(image.astype(int) - expected).mean() < 3


def test_to_rgb_uint8_rejects_bad_shapes_and_nan() -> None:
    with pytest.raises(DataFileError):
        to_rgb_uint8(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(DataFileError):
        to_rgb_uint8(np.full((4, 4), np.nan, dtype=np.float32))


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert _problem(path).kind is ProblemKind.EMPTY


def test_truncated_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    data = FUNDUS_FILE.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    error = _problem(path)
    assert error.kind is ProblemKind.TRUNCATED and "truncated" in error.reason


def test_text_with_image_extension(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("clinical notes, not an image\n" * 10)
    error = _problem(path)
    assert error.kind is ProblemKind.NOT_AN_IMAGE and ".jpg" in error.reason


def _png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + b"\x00\x00\x00\x00IEND\xaeB`\x82"
    )


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(60_000, 60_000))
    assert _problem(path).kind is ProblemKind.TOO_LARGE


def test_mislabelled_extensions_are_read_by_content(tmp_path: Path) -> None:
    png_as_dcm = tmp_path / "photo.dcm"
    buffer = io.BytesIO()
    Image.fromarray(fundus_rgb()).save(buffer, format="PNG")
    png_as_dcm.write_bytes(buffer.getvalue())
    assert np.array_equal(read_any_image(png_as_dcm), fundus_rgb())

    dicom_as_jpg = tmp_path / "scan.jpg"
    write_native(tmp_path / "scan.dcm", fundus_rgb())
    shutil.move(tmp_path / "scan.dcm", dicom_as_jpg)
    assert np.array_equal(read_any_image(dicom_as_jpg), fundus_rgb())


def test_missing_file(tmp_path: Path) -> None:
    assert _problem(tmp_path / "gone.png").kind is ProblemKind.FILE_NOT_FOUND
