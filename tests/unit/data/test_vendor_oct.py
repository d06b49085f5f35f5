"""Hospital files as they come: Netpbm photographs (STARE's .ppm) and vendor OCT exports (Topcon .fda/.fds,
Heidelberg .e2e, real samples from rse-panimg), through the same site scan, preflight and patient split."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import simulations
from visionfm_core.data.files import read_any_image
from visionfm_core.data.patients import split_by_patient
from visionfm_core.data.preflight import check_site_data
from visionfm_core.data.problems import ProblemKind
from visionfm_core.data.site import open_site

SAMPLES = Path(__file__).parent / "oct_vendor"
HRF = Path(simulations.__file__).parent / "data" / "hrf" / "images" / "01_h.jpg"
OCT_JPEG = sorted((Path(simulations.__file__).parent / "data" / "oct2017_val" / "val" / "CNV").glob("*.jpeg"))[0]


@pytest.fixture
def netpbm_site(tmp_path: Path) -> Path:
    """STARE-style photographs: a colour .ppm, a grey .pgm, and a .ppm cut short in transfer."""
    site = tmp_path / "stare"
    site.mkdir()
    with Image.open(HRF) as photo:
        photo.resize((292, 195)).save(site / "im0001.ppm")
    with Image.open(OCT_JPEG) as scan:
        scan.convert("L").save(site / "im0002.pgm")
    (site / "im0003.ppm").write_bytes((site / "im0001.ppm").read_bytes()[:5000])
    return site


def test_netpbm_photographs_are_read_like_any_image(netpbm_site: Path) -> None:
    colour = read_any_image(netpbm_site / "im0001.ppm")
    with Image.open(HRF) as photo:
        assert np.array_equal(colour, np.asarray(photo.resize((292, 195))))
    grey = read_any_image(netpbm_site / "im0002.pgm")
    assert grey.shape[2] == 3 and np.array_equal(grey[..., 0], grey[..., 2])
    report = check_site_data(netpbm_site, "fundus")
    assert report.usable_images == 2
    assert [Path(s.path).name for s in report.unreadable] == ["im0003.ppm"]


def _vendor_site(tmp_path: Path) -> Path:
    site = tmp_path / "oct_exports"
    site.mkdir()
    for sample in SAMPLES.iterdir():
        if sample.suffix.lower() in (".fda", ".fds", ".e2e"):
            shutil.copy(sample, site / sample.name)
    (site / "cut.fda").write_bytes((SAMPLES / "fda_minimized.fda").read_bytes()[:20_000])  # transfer cut short
    return site


def test_every_bscan_of_a_vendor_export_is_an_oct_item(tmp_path: Path) -> None:
    pytest.importorskip("oct_converter", reason="the optional 'oct' extra (oct-converter) is not installed")
    site = _vendor_site(tmp_path)
    scan = open_site(site, "oct")
    frames = sorted((Path(i.source).name, i.frame) for i in scan.items)
    assert frames == [("fda_minimized.fda", 0)] + [("fds_minimized.fds", f) for f in range(4)]
    assert {i.modality for i in scan.items} == {"oct"} and {i.laterality for i in scan.items} == {"L"}
    first = read_any_image(site / "fda_minimized.fda", 0)
    assert first.shape == (650, 512, 3) and first.dtype == np.uint8 and first.std() > 0
    assert all(item.load().ndim == 3 for item in scan.items)
    # Bad or truncated exports are skipped and named like any bad file.
    skipped = {Path(s.path).name: s for s in scan.skipped}
    assert set(skipped) == {"cut.fda", "e2e_minimized.E2E"}
    assert "Topcon .fda export, damaged or truncated" in skipped["cut.fda"].reason
    assert "Heidelberg .e2e export" in skipped["e2e_minimized.E2E"].reason
    assert {s.kind for s in skipped.values()} == {ProblemKind.CORRUPT}


def test_the_fundus_image_of_an_export_is_a_fundus_item(tmp_path: Path) -> None:
    pytest.importorskip("oct_converter", reason="the optional 'oct' extra (oct-converter) is not installed")
    site = _vendor_site(tmp_path)
    scan = open_site(site, "fundus")
    assert sorted((Path(i.source).name, i.frame) for i in scan.items) == [
        ("fda_minimized.fda", -1), ("fds_minimized.fds", -1)]
    assert {i.modality for i in scan.items} == {"fundus"}
    assert scan.items[0].load().shape == (3, 2, 3)  # the minimised sample keeps a 2x3 thumbnail
    everything = open_site(site)  # no site modality: both kinds, each named by what it is
    assert sorted(i.modality or "" for i in everything.items) == ["fundus"] * 2 + ["oct"] * 5


def test_bscans_are_grouped_by_eye_and_visit_for_the_patient_split(tmp_path: Path) -> None:
    pytest.importorskip("oct_converter", reason="the optional 'oct' extra (oct-converter) is not installed")
    site = _vendor_site(tmp_path)
    (site / "e2e_minimized.E2E").unlink()
    items = open_site(site).items
    keys = {i.patient_key for i in items}
    # Both Topcon samples are patient "1", left eye, 2010-07-09: one group, and no raw ID in the key.
    assert len(keys) == 1 and None not in keys and all("2010" not in str(k) for k in keys)
    for seed in range(5):
        parts = split_by_patient(items, {"train": 0.5, "val": 0.5}, seed=seed)
        assert sorted(len(p) for p in parts.values()) == [0, len(items)]  # never cut between splits


def test_vendor_exports_without_the_reader_are_named_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = _vendor_site(tmp_path)
    monkeypatch.setitem(sys.modules, "oct_converter", None)  # as if the extra were not installed
    monkeypatch.setitem(sys.modules, "oct_converter.readers", None)
    report = check_site_data(site, "oct")
    missing = [s for s in report.unreadable if s.kind is ProblemKind.MISSING_CODEC]
    assert sorted(Path(s.path).name for s in missing) == ["cut.fda", "e2e_minimized.E2E", "fda_minimized.fda",
                                                           "fds_minimized.fds"]
    assert all("pip install 'visionfm-fed[oct]'" in s.reason for s in missing)


def test_bscans_are_read_from_frames_decoded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Training asks for B-scans one at a time in random order: after indexing, a frame is a small
    array read, not a parse of the whole export (here the parser is gone and frames still load)."""
    pytest.importorskip("oct_converter", reason="the optional 'oct' extra (oct-converter) is not installed")
    from visionfm_core.data import vendor_oct

    site = _vendor_site(tmp_path)
    parsed = {(str(site / name), frame): read_any_image(site / name, frame)  # before any conversion
              for name, frames in (("fda_minimized.fda", 1), ("fds_minimized.fds", 4)) for frame in range(frames)}
    items = open_site(site, "oct").items
    expected = [parsed[(item.source, item.frame)] for item in items]
    vendor_oct._cache.clear()
    monkeypatch.setitem(sys.modules, "oct_converter", None)
    monkeypatch.setitem(sys.modules, "oct_converter.readers", None)
    assert all(np.array_equal(item.load(), want) for item, want in zip(items, expected, strict=True))
    assert all(vendor_oct.frames_cache_path(item.source).is_file() for item in items)
    assert all(site not in vendor_oct.frames_cache_path(item.source).parents for item in items)  # never in the data
