"""The header index: built once, refreshed incrementally by size and mtime, never storing raw IDs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pydicom
from PIL import Image

from visionfm_core.data.index import INDEX_FILE, index_site
from visionfm_core.data.patients import load_or_create_salt

from .dicom_factory import fundus_rgb, write_native

SALT = b"k" * 32


def test_first_build_reads_every_candidate_file(mixed_site: Path, tmp_path: Path) -> None:
    index = index_site(mixed_site, tmp_path / "state", SALT)
    paths = set(index.entries)
    assert "PAT_A/study1/volume.dcm" in paths and "PAT_B/IM000001" in paths
    assert not any(p.startswith(".trash") or p.endswith(".txt") for p in paths)
    assert index.stats.read == index.stats.files == len(paths) == 9
    volume = index.entries["PAT_A/study1/volume.dcm"]
    assert (volume.kind, volume.frames, volume.modality, volume.laterality) == ("dicom", 5, "oct", "R")
    assert index.entries["PAT_B/IM000001"].kind == "dicom"  # found by content, no extension
    photo = index.entries["photos/camera_02.png"]
    assert (photo.kind, photo.width, photo.height) == ("image", 96, 64)
    problems = {e.path: e.problem for e in index.problems()}
    assert problems == {"bad/empty.jpg": "empty_file", "bad/notes.jpg": "not_an_image"}
    # A truncated JPEG has an intact header: the index cannot see it, decoding (check) does.
    assert index.entries["bad/cut.jpg"].kind == "image"


def test_refresh_rereads_only_changed_files(mixed_site: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = index_site(mixed_site, state, SALT)
    again = index_site(mixed_site, state, SALT)
    assert again.stats.read == 0 and again.stats.reused == first.stats.files
    assert again.entries == first.entries

    changed = mixed_site / "photos" / "camera_02.png"
    Image.fromarray(fundus_rgb("06_dr", size=(40, 30))).save(changed)
    os.utime(changed, ns=(1, 1))  # a different mtime even on coarse file systems
    (mixed_site / "bad" / "notes.jpg").unlink()
    write_native(mixed_site / "PAT_B" / "IM000002", fundus_rgb("07_g"), patient_id="MRN-B")
    third = index_site(mixed_site, state, SALT)
    assert third.stats.read == 2 and third.stats.removed == 1
    assert third.entries["photos/camera_02.png"].width == 40
    assert "bad/notes.jpg" not in third.entries


def test_index_file_holds_no_raw_patient_id(mixed_site: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    index = index_site(mixed_site, state, SALT)
    text = (state / INDEX_FILE).read_text()
    assert "MRN-A" not in text and "MRN-B" not in text
    key_a = index.entries["PAT_A/study1/fundus_R.dcm"].patient_key
    assert key_a is not None and key_a == index.entries["PAT_A/study1/volume.dcm"].patient_key
    assert index.entries["PAT_B/IM000001"].patient_key not in (None, key_a)


def test_another_salt_rebuilds_the_index(mixed_site: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    index_site(mixed_site, state, SALT)
    rebuilt = index_site(mixed_site, state, b"z" * 32)
    assert rebuilt.stats.reused == 0


def test_corrupt_index_file_is_rebuilt(mixed_site: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    index_site(mixed_site, state, SALT)
    (state / INDEX_FILE).write_text("{not json")
    index = index_site(mixed_site, state, SALT)
    assert index.stats.read == index.stats.files == 9
    json.loads((state / INDEX_FILE).read_text())


def test_salt_is_created_once_and_kept_private(tmp_path: Path) -> None:
    first = load_or_create_salt(tmp_path / "state")
    assert load_or_create_salt(tmp_path / "state") == first and len(first) == 32
    assert (tmp_path / "state" / "patient-salt").stat().st_mode & 0o077 == 0


def test_changed_dicom_header_is_picked_up(mixed_site: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    index_site(mixed_site, state, SALT)
    path = mixed_site / "PAT_A" / "study1" / "fundus_R.dcm"
    ds = pydicom.dcmread(path)
    ds.ImageLaterality = "L"
    ds.save_as(path)
    os.utime(path, ns=(2, 2))
    assert index_site(mixed_site, state, SALT).entries["PAT_A/study1/fundus_R.dcm"].laterality == "L"
