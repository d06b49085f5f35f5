"""Property-based fuzzing of every reader (over 1,000 generated cases in all): whatever the bytes, a
reader returns a valid (H, W, 3) uint8 image or raises a DataError naming the file; no other
exception, no hang (pytest-timeout), no unbounded memory (headers are checked before decoding)."""

from __future__ import annotations

import io
import resource
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

from visionfm_core.data.dicom_header import read_dicom_header
from visionfm_core.data.dicom_pixels import read_dicom_frame
from visionfm_core.data.files import read_any_image
from visionfm_core.data.index import index_site
from visionfm_core.data.labels import read_label_rows
from visionfm_core.data.sources import load_npz_split
from visionfm_core.errors import DataError

from .dicom_factory import OPT, write_encapsulated, write_native, write_rle

# One profile for every fuzz test: small inputs, no deadline (CI machines are slow and shared), no
# example database written into the repository.
FUZZ = settings(
    deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
pytestmark = pytest.mark.timeout(180)

WORK = Path(tempfile.mkdtemp(prefix="visionfm-fuzz-"))


@pytest.fixture(scope="module", autouse=True)
def _remove_work_folder() -> Iterator[None]:
    # Hypothesis examples write into one folder made at import (fixtures do not reset between examples).
    yield
    shutil.rmtree(WORK, ignore_errors=True)

RGB = (np.arange(8 * 6 * 3, dtype=np.uint8).reshape(8, 6, 3) * 5) % 251
GREY = np.stack([(np.arange(8 * 6, dtype=np.uint8).reshape(8, 6) * (k + 3)) % 251 for k in range(3)])


def _image_seeds() -> list[bytes]:
    seeds = []
    for fmt, mode in (
        ("PNG", "RGB"),
        ("JPEG", "RGB"),
        ("GIF", "P"),
        ("BMP", "RGB"),
        ("TIFF", "RGB"),
        ("PNG", "I;16"),
        ("JPEG2000", "RGB"),
    ):
        buffer = io.BytesIO()
        image = (
            Image.fromarray(RGB).convert(mode)
            if mode != "I;16"
            else Image.fromarray(GREY[0].astype(np.uint16) * 200)
        )
        image.save(buffer, format=fmt)
        seeds.append(buffer.getvalue())
    return seeds


def _dicom_seeds() -> list[bytes]:
    folder = WORK / "seeds"
    folder.mkdir(exist_ok=True)
    paths = [
        write_native(folder / "op.dcm", RGB),
        write_native(folder / "opt.dcm", GREY, sop_class=OPT, modality="OPT", photometric="MONOCHROME2"),
        write_rle(folder / "rle.dcm", GREY, sop_class=OPT, modality="OPT", photometric="MONOCHROME2"),
        write_encapsulated(folder / "j2k.dcm", [RGB], "j2k"),
        write_encapsulated(folder / "jpg.dcm", list(GREY), "jpeg", sop_class=OPT, modality="OPT"),
    ]
    return [p.read_bytes() for p in paths]


IMAGE_SEEDS = _image_seeds()
DICOM_SEEDS = _dicom_seeds()


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A valid seed with a few bytes overwritten, a cut, or both."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for position, value in draw(
        st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), max_size=6)
    ):
        data[position] = value
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def _write(data: bytes, suffix: str) -> Path:
    path = WORK / f"case{suffix}"
    path.write_bytes(data)
    return path


def _decodes_or_refuses(read: Callable[[], np.ndarray], path: Path) -> None:
    try:
        image = read()
    except DataError as exc:
        assert exc.path == str(path) and exc.reason and "\n" not in exc.reason
        return
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8 and image.size > 0


@pytest.fixture(scope="module", autouse=True)
def _memory_stays_bounded() -> object:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 1024, f"fuzzing raised peak memory by {grown_mib:.0f} MiB"


@settings(FUZZ, max_examples=250)
@given(
    data=st.one_of(mutated(IMAGE_SEEDS), st.binary(max_size=256)),
    suffix=st.sampled_from([".png", ".jpg", ".tif", ".bin", ""]),
)
def test_image_reader(data: bytes, suffix: str) -> None:
    path = _write(data, suffix)
    _decodes_or_refuses(lambda: read_any_image(path), path)


@settings(FUZZ, max_examples=250)
@given(
    data=st.one_of(mutated(DICOM_SEEDS), st.binary(max_size=200).map(lambda b: b"\0" * 128 + b"DICM" + b)),
    frame=st.integers(0, 3),
)
def test_dicom_reader_on_damaged_files(data: bytes, frame: int) -> None:
    path = _write(data, ".dcm")
    _decodes_or_refuses(lambda: read_dicom_frame(path, frame), path)


SYNTAXES = [
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.102",
    "1.2.3.4.5.6.7.8.9.10",
]
PHOTOMETRIC = ["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR", "HSV", ""]


@settings(FUZZ, max_examples=200)
@given(
    rows=st.integers(0, 65535),
    columns=st.integers(0, 65535),
    frames=st.none() | st.integers(0, 50_000),
    samples=st.integers(0, 4),
    bits=st.sampled_from([0, 1, 8, 12, 16, 32, 64]),
    photometric=st.sampled_from(PHOTOMETRIC),
    syntax=st.sampled_from(SYNTAXES),
    representation=st.integers(0, 1),
    pixels=st.binary(max_size=512),
    extra=st.dictionaries(
        st.sampled_from(["WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept"]),
        st.floats(-1e6, 1e6, allow_nan=False),
        max_size=3,
    ),
)
def test_dicom_reader_on_generated_headers(
    rows: int,
    columns: int,
    frames: int | None,
    samples: int,
    bits: int,
    photometric: str,
    syntax: str,
    representation: int,
    pixels: bytes,
    extra: dict[str, float],
) -> None:
    # pydicom refuses to write an unknown transfer syntax: write Explicit VR LE, then swap the UID bytes.
    unknown = not UID(syntax).is_transfer_syntax
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1" if unknown else syntax)
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.77.1.5.4")
    ds.file_meta.MediaStorageSOPInstanceUID = UID("1.2.3")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, samples
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = max(bits - 1, 0)
    ds.PixelRepresentation = representation
    ds.PhotometricInterpretation = photometric
    if frames is not None:
        ds.NumberOfFrames = frames
    for key, value in extra.items():
        setattr(ds, key, f"{value:.6g}"[:16])
    if not unknown and UID(syntax).is_encapsulated:
        ds.PixelData = pydicom.encaps.encapsulate([pixels or b"\0\0"])
    else:
        ds.PixelData = pixels + b"\0" * (len(pixels) % 2)
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.preamble = b"\0" * 128
    big_endian = syntax == "1.2.840.10008.1.2.2"
    ds.save_as(buffer, implicit_vr=syntax == "1.2.840.10008.1.2", little_endian=not big_endian)
    written = buffer.getvalue()
    if unknown:
        written = written.replace(b"1.2.840.10008.1.2.1\0", b"1.2.3.4.5.6.7.8.9.10", 1)
    path = _write(written, ".dcm")
    _decodes_or_refuses(lambda: read_dicom_frame(path, 0), path)
    try:
        header = read_dicom_header(path)
    except DataError:
        return
    assert header.rows * header.columns <= 8192 * 8192 and header.frames <= 10_000


@settings(FUZZ, max_examples=150)
@given(
    text=st.one_of(
        st.text(max_size=300),
        st.lists(
            st.lists(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=12), max_size=4),
            max_size=8,
        ).map(lambda rows: "path,label,patient_id\n" + "\n".join(",".join(r) for r in rows)),
    )
)
def test_labels_csv_reader(text: str) -> None:
    path = WORK / "labels.csv"
    path.write_text(text, encoding="utf-8")
    try:
        rows = read_label_rows(path)
    except DataError as exc:
        assert exc.path == str(path)
        return
    assert all(rel and row.label for rel, row in rows.items())


def _npz_seed() -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer, train_images=np.stack([RGB, RGB]), train_labels=np.array([[0], [1]], dtype=np.uint8)
    )
    return buffer.getvalue()


def _npz_bomb() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": "|u1", "fortran_order": False, "shape": (100_000, 224, 224, 3)}
        )
        archive.writestr("train_images.npy", header.getvalue() + b"\0" * 70_000_000)
    return buffer.getvalue()


NPZ_SEEDS = [_npz_seed(), _npz_bomb()]


@settings(FUZZ, max_examples=150)
@given(data=st.one_of(mutated(NPZ_SEEDS), st.binary(max_size=200)))
def test_npz_reader(data: bytes) -> None:
    path = _write(data, ".npz")
    try:
        result = load_npz_split(path, "train")
    except DataError as exc:
        assert exc.path == str(path)
        return
    for item in result.items:
        assert item.load().shape[2] == 3


@settings(FUZZ, max_examples=40)
@given(
    files=st.lists(
        st.tuples(
            st.sampled_from(["a.png", "b.dcm", "c", "d/e.jpg", "d/f.dcm", "g.txt"]),
            st.one_of(mutated(IMAGE_SEEDS + DICOM_SEEDS), st.binary(max_size=64)),
        ),
        max_size=5,
        unique_by=lambda f: f[0],
    )
)
def test_index_never_stops_on_a_bad_file(files: list[tuple[str, bytes]]) -> None:
    root = Path(tempfile.mkdtemp(dir=WORK))
    for name, data in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    index = index_site(root, root.parent / f"{root.name}-state", salt=b"f" * 32)
    expected = {name for name, _ in files if not name.endswith(".txt")}
    assert set(index.entries) == expected
    for entry in index.entries.values():
        assert entry.kind in ("image", "dicom") or (entry.problem and entry.reason)
