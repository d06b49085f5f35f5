"""DICOM: OP and OPT files built from the real sample images decode to the source pixels; pydicom's
bundled files cover the other photometric cases; every bad file is one clear, categorised error."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import UID

from visionfm_core.data.dicom_header import read_dicom_header
from visionfm_core.data.dicom_pixels import read_dicom_frame
from visionfm_core.data.problems import DataFileError, ProblemKind

from .dicom_factory import (
    DATA,
    OP_16BIT,
    OPT,
    SECONDARY_CAPTURE,
    fundus_rgb,
    oct_volume,
    write_encapsulated,
    write_native,
    write_rle,
)

SALT = b"s" * 32


def pydicom_file(name: str) -> Path:
    path = get_testdata_file(name, download=False)  # bundled with pydicom: never downloads
    assert isinstance(path, str), f"pydicom test file {name} not bundled"
    return Path(path)


def _grey(image: np.ndarray) -> np.ndarray:
    assert np.array_equal(image[:, :, 0], image[:, :, 1]) and np.array_equal(image[:, :, 0], image[:, :, 2])
    return image[:, :, 0]


# --- ophthalmic photography (OP) -------------------------------------------------------------------


def test_op_colour_uncompressed_is_exact(tmp_path: Path) -> None:
    rgb = fundus_rgb()
    path = write_native(tmp_path / "op.dcm", rgb)
    assert np.array_equal(read_dicom_frame(path), rgb)


def test_op_colour_rle_is_exact(tmp_path: Path) -> None:
    rgb = fundus_rgb()
    assert np.array_equal(read_dicom_frame(write_rle(tmp_path / "op.dcm", rgb)), rgb)


def test_op_colour_jpeg2000_lossless_is_exact(tmp_path: Path) -> None:
    rgb = fundus_rgb("02_g")
    assert np.array_equal(read_dicom_frame(write_encapsulated(tmp_path / "op.dcm", [rgb], "j2k")), rgb)


def test_op_colour_jpeg_baseline_ybr422_matches_pillow_decode_of_the_same_stream(tmp_path: Path) -> None:
    rgb = fundus_rgb("03_dr")
    path = write_encapsulated(tmp_path / "op.dcm", [rgb], "jpeg")
    decoded = read_dicom_frame(path)
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    fragment = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    with Image.open(io.BytesIO(fragment)) as stream:
        reference = np.asarray(stream.convert("RGB"))
    # Same codestream: decoders (Pillow's libjpeg-turbo, or pylibjpeg when installed) differ only in
    # IDCT, chroma upsampling and YCbCr->RGB rounding; lossy vs the source: small on average.
    assert np.abs(decoded.astype(int) - reference).max() <= 8
    assert np.abs(decoded.astype(int) - reference).mean() < 1
    assert np.abs(decoded.astype(int) - rgb).mean() < 4


def test_real_hrf_jpeg_wrapped_unchanged_in_dicom_decodes_like_the_jpeg_file(tmp_path: Path) -> None:
    source = DATA / "hrf" / "images" / "05_g.jpg"
    with Image.open(source) as image:
        reference = np.asarray(image.convert("RGB"))
    ds = pydicom.dcmread(write_encapsulated(tmp_path / "x.dcm", [fundus_rgb()], "jpeg"))
    ds.Rows, ds.Columns = reference.shape[:2]
    ds.PixelData = pydicom.encaps.encapsulate([source.read_bytes()])
    ds.save_as(tmp_path / "real.dcm", enforce_file_format=True)
    decoded = read_dicom_frame(tmp_path / "real.dcm")
    assert decoded.shape == reference.shape
    assert np.abs(decoded.astype(int) - reference).max() <= 8
    assert np.abs(decoded.astype(int) - reference).mean() < 1


def test_op_sixteen_bit_colour_scales_to_the_source(tmp_path: Path) -> None:
    rgb = fundus_rgb()
    path = write_native(tmp_path / "op16.dcm", rgb.astype(np.uint16) * 257, sop_class=OP_16BIT)
    assert np.array_equal(read_dicom_frame(path), rgb)


def test_op_monochrome_twelve_bits_stored_scales_by_bits_stored(tmp_path: Path) -> None:
    grey = oct_volume(1)[0]
    path = write_native(
        tmp_path / "op12.dcm", grey.astype(np.uint16) * 16, photometric="MONOCHROME2", bits_stored=12
    )
    expected = np.rint(grey.astype(np.float64) * 16 / 4095 * 255).astype(np.uint8)
    assert np.abs(_grey(read_dicom_frame(path)).astype(int) - expected).max() <= 1


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    grey = oct_volume(1)[0]
    path = write_native(
        tmp_path / "m1.dcm", 255 - grey, photometric="MONOCHROME1", sop_class=OPT, modality="OPT"
    )
    assert np.array_equal(_grey(read_dicom_frame(path)), grey)


def test_window_center_width_maps_the_window_to_full_range(tmp_path: Path) -> None:
    grey = oct_volume(1)[0]
    path = write_native(
        tmp_path / "w.dcm", grey, photometric="MONOCHROME2", extra={"WindowCenter": 100, "WindowWidth": 80}
    )
    expected = np.clip(np.rint((grey.astype(np.float64) - 60) * 255 / 80), 0, 255)
    assert np.abs(_grey(read_dicom_frame(path)).astype(int) - expected).max() <= 1


def test_rescale_slope_intercept_without_window_uses_the_data_range(tmp_path: Path) -> None:
    grey = oct_volume(1)[0]
    path = write_native(
        tmp_path / "r.dcm",
        grey,
        photometric="MONOCHROME2",
        extra={"RescaleSlope": 2, "RescaleIntercept": -100},
    )
    values = grey.astype(np.float64) * 2 - 100
    expected = np.rint((values - values.min()) / (values.max() - values.min()) * 255)
    assert np.abs(_grey(read_dicom_frame(path)).astype(int) - expected).max() <= 1


# --- ophthalmic tomography (OPT): multi-frame volumes -------------------------------------------------


@pytest.mark.parametrize("writer", ["native", "rle", "j2k"])
def test_opt_volume_frames_are_exact(tmp_path: Path, writer: str) -> None:
    volume = oct_volume(5)
    path = tmp_path / "opt.dcm"
    if writer == "native":
        write_native(path, volume, sop_class=OPT, modality="OPT", photometric="MONOCHROME2")
    elif writer == "rle":
        write_rle(path, volume, sop_class=OPT, modality="OPT", photometric="MONOCHROME2")
    else:
        write_encapsulated(path, list(volume), "j2k", sop_class=OPT, modality="OPT")
    header = read_dicom_header(path)
    assert header.frames == 5 and header.modality == "oct"
    for index in (0, 2, 4):
        assert np.array_equal(_grey(read_dicom_frame(path, index)), volume[index])


def test_opt_jpeg_baseline_volume_is_close(tmp_path: Path) -> None:
    volume = oct_volume(3)
    path = write_encapsulated(tmp_path / "opt.dcm", list(volume), "jpeg", sop_class=OPT, modality="OPT")
    for index in range(3):
        assert np.abs(_grey(read_dicom_frame(path, index)).astype(int) - volume[index]).mean() < 3


def test_frame_out_of_range(tmp_path: Path) -> None:
    path = write_native(
        tmp_path / "opt.dcm", oct_volume(2), sop_class=OPT, modality="OPT", photometric="MONOCHROME2"
    )
    with pytest.raises(DataFileError, match="frame 2 out of range"):
        read_dicom_frame(path, 2)


# --- header facts --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sop_class", "modality_tag", "extra", "expected"),
    [
        ("1.2.840.10008.5.1.4.1.1.77.1.5.1", "OP", {}, "fundus"),
        ("1.2.840.10008.5.1.4.1.1.77.1.5.1", "OP", {"SeriesDescription": "Fluorescein angiography"}, "ffa"),
        ("1.2.840.10008.5.1.4.1.1.77.1.5.1", "OP", {"SeriesDescription": "slit lamp anterior"}, "slit_lamp"),
        ("1.2.840.10008.5.1.4.1.1.77.1.5.4", "OPT", {}, "oct"),
        ("1.2.840.10008.5.1.4.1.1.6.1", "US", {"ProtocolName": "UBM angle"}, "ubm"),
        ("1.2.840.10008.5.1.4.1.1.6.1", "US", {}, "ultrasound"),
        ("1.2.840.10008.5.1.4.1.1.7", "OT", {}, None),
        ("1.2.840.10008.5.1.4.1.1.7", "OT", {"SeriesDescription": "OCT B-scan export"}, "oct"),
        ("1.2.840.10008.5.1.4.1.1.77.1.4", "XC", {}, "external_eye"),
        # An OCT description does not turn a photograph into OCT: only refinements within a family.
        ("1.2.840.10008.5.1.4.1.1.77.1.5.1", "OP", {"StudyDescription": "OCT and fundus"}, "fundus"),
    ],
)
def test_modality_from_tags(
    tmp_path: Path, sop_class: str, modality_tag: str, extra: dict[str, str], expected: str | None
) -> None:
    path = write_native(
        tmp_path / "x.dcm", fundus_rgb(), sop_class=UID(sop_class), modality=modality_tag, extra=extra
    )
    assert read_dicom_header(path).modality == expected


def test_laterality_and_salted_patient_key(tmp_path: Path) -> None:
    path = write_native(tmp_path / "x.dcm", fundus_rgb(), patient_id="MRN-4711", laterality="L")
    header = read_dicom_header(path, SALT)
    assert header.laterality == "L"
    assert header.patient_key and "4711" not in header.patient_key
    other_site = read_dicom_header(path, b"t" * 32)
    assert other_site.patient_key != header.patient_key  # not linkable across sites
    assert read_dicom_header(path).patient_key is None  # no salt, no key


# --- pydicom's bundled files: the other photometric interpretations and layouts --------------------------

RGB_REFERENCE = "SC_rgb_rle.dcm"


@pytest.mark.parametrize(
    ("name", "tolerance"),
    [
        ("SC_rgb_rle_16bit.dcm", 0),  # 16-bit RGB
        ("SC_rgb_rle_32bit.dcm", 0),  # 32-bit RGB
        ("SC_ybr_full_422_uncompressed.dcm", 2),  # native YBR_FULL_422 (subsampled layout)
        ("SC_rgb_jpeg_dcmtk.dcm", 2),  # JPEG, YBR_FULL
        ("SC_rgb_dcmtk_+eb+cr.dcm", 1),  # JPEG, RGB colour space
        ("SC_rgb_dcmtk_+eb+cy+s2.dcm", 2),  # JPEG, YBR_FULL_422
        ("SC_rgb_dcmtk_+eb+cy+np.dcm", 4),  # JPEG, YBR_FULL_422 without subsampling flag
    ],
)
def test_pydicom_colour_variants_decode_to_the_same_picture(name: str, tolerance: float) -> None:
    reference = read_dicom_frame(pydicom_file(RGB_REFERENCE)).astype(int)
    decoded = read_dicom_frame(pydicom_file(name)).astype(int)
    assert decoded.shape == reference.shape
    assert np.abs(decoded - reference).mean() <= tolerance


def test_planar_configuration_one_is_interleaved(tmp_path: Path) -> None:
    rgb = fundus_rgb()
    planar = np.ascontiguousarray(rgb.transpose(2, 0, 1))
    path = write_native(tmp_path / "planar.dcm", rgb, extra={"PlanarConfiguration": 1})
    ds = pydicom.dcmread(path)
    ds.PixelData = planar.tobytes()
    ds.save_as(path)
    assert np.array_equal(read_dicom_frame(path), rgb)


def test_palette_colour_uses_the_lookup_table() -> None:
    from pydicom.pixels.processing import apply_color_lut

    path = pydicom_file("examples_palette.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        expected = apply_color_lut(ds.pixel_array, ds).astype(np.float64) / 65535 * 255
    decoded = read_dicom_frame(path)
    assert decoded.shape == (*ds.pixel_array.shape, 3)
    assert np.abs(decoded - expected).max() <= 1


@pytest.mark.parametrize(
    "name",
    ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm"],
)
def test_mr_encodings_agree(name: str) -> None:
    assert np.array_equal(
        read_dicom_frame(pydicom_file(name)), read_dicom_frame(pydicom_file("MR_small.dcm"))
    )


def test_mr_window_from_file_is_applied() -> None:
    path = pydicom_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    low = float(ds.WindowCenter) - float(ds.WindowWidth) / 2
    expected = np.clip(np.rint((ds.pixel_array - low) * 255 / float(ds.WindowWidth)), 0, 255)
    assert np.abs(_grey(read_dicom_frame(path)).astype(int) - expected).max() <= 1


# --- bad files -----------------------------------------------------------------------------------------


def _problem(path: Path) -> DataFileError:
    with pytest.raises(DataFileError) as info:
        read_dicom_frame(path)
    assert info.value.path == str(path) and info.value.reason
    return info.value


def test_truncated_files(tmp_path: Path) -> None:
    assert _problem(pydicom_file("MR_truncated.dcm")).kind is ProblemKind.TRUNCATED
    path = write_native(tmp_path / "op.dcm", fundus_rgb())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 500])
    assert _problem(path).kind is ProblemKind.TRUNCATED
    path.write_bytes(data[:200])  # cut inside the header
    assert _problem(path).kind in (ProblemKind.TRUNCATED, ProblemKind.MISSING_PIXEL_DATA)


def test_truncated_compressed_frame(tmp_path: Path) -> None:
    path = write_encapsulated(tmp_path / "op.dcm", [fundus_rgb()], "j2k")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - len(data) // 3])
    assert _problem(path).kind in (ProblemKind.TRUNCATED, ProblemKind.CORRUPT)


def test_zero_byte_dicom(tmp_path: Path) -> None:
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    assert _problem(path).kind is ProblemKind.EMPTY


def test_missing_pixel_data(tmp_path: Path) -> None:
    path = write_native(tmp_path / "op.dcm", fundus_rgb())
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    assert _problem(path).kind is ProblemKind.MISSING_PIXEL_DATA
    assert _problem(pydicom_file("rtplan.dcm")).kind is ProblemKind.MISSING_PIXEL_DATA


def test_unsupported_transfer_syntax_names_it(tmp_path: Path) -> None:
    path = write_native(tmp_path / "op.dcm", fundus_rgb())
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.102")  # MPEG-4 AVC/H.264: a video
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x00\x00\x01" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    error = _problem(path)
    assert error.kind is ProblemKind.UNSUPPORTED_TRANSFER_SYNTAX and "MPEG-4" in error.reason


def test_decompression_bomb_header_is_refused(tmp_path: Path) -> None:
    path = write_native(tmp_path / "op.dcm", fundus_rgb())
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 65535, 65535
    ds.save_as(path)
    assert _problem(path).kind is ProblemKind.TOO_LARGE


def test_not_dicom_and_dicomdir(tmp_path: Path) -> None:
    path = tmp_path / "report.dcm"
    path.write_bytes(b"%PDF-1.4 not a dicom file" * 20)
    assert _problem(path).kind is ProblemKind.NOT_AN_IMAGE
    dicomdir = Path(pydicom_file("dicomdirtests")) / "DICOMDIR"
    assert _problem(dicomdir).kind is ProblemKind.NOT_AN_IMAGE


def _plugin_available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.skipif(not _plugin_available("libjpeg"), reason="optional dicom-codecs extra not installed")
def test_jpeg_ls_decodes_with_the_optional_plugin() -> None:
    decoded = read_dicom_frame(pydicom_file("MR_small_jpeg_ls_lossless.dcm"))
    assert np.array_equal(decoded, read_dicom_frame(pydicom_file("MR_small.dcm")))


def test_jpeg_ls_without_plugin_says_which_syntax_and_what_to_install() -> None:
    # A real interpreter in which the optional plugins cannot be imported (as on a site without the
    # extra), whether or not this environment has them.
    script = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"pylibjpeg", "libjpeg", "openjpeg", "rle", "gdcm", "jpeg_ls"}:
                    raise ImportError(name)
                return None
        sys.meta_path.insert(0, Block())
        from visionfm_core.data.dicom_pixels import read_dicom_frame
        from visionfm_core.data.problems import DataFileError
        try:
            read_dicom_frame(sys.argv[1])
        except DataFileError as exc:
            print(exc.kind.value, "|", exc.reason)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(pydicom_file("MR_small_jpeg_ls_lossless.dcm"))],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    kind, reason = result.stdout.strip().split(" | ")
    assert kind == ProblemKind.MISSING_CODEC.value
    assert "JPEG-LS Lossless" in reason and "dicom-codecs" in reason and "pylibjpeg-libjpeg" in reason


def test_secondary_capture_without_hints_has_no_modality(tmp_path: Path) -> None:
    path = write_native(tmp_path / "sc.dcm", fundus_rgb(), sop_class=SECONDARY_CAPTURE, modality="OT")
    header = read_dicom_header(path)
    assert header.modality is None and header.frames == 1
