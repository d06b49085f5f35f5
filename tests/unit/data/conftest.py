"""Keep every test's site state (index, salt) in a temporary folder, never in the user's cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from visionfm_core.data.state import STATE_ENV


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    state = tmp_path_factory.mktemp("visionfm-state")
    monkeypatch.setenv(STATE_ENV, str(state))
    return state


@pytest.fixture
def mixed_site(tmp_path: Path) -> Path:
    """A hospital-style folder: nested PACS-like DICOM (OP, multi-frame OPT, no extension), device
    photos, a sidecar file, a hidden folder, and one file of each kind of trouble."""
    from PIL import Image

    from .dicom_factory import OPT, fundus_rgb, oct_volume, write_native

    root = tmp_path / "site"
    study = root / "PAT_A" / "study1"
    study.mkdir(parents=True)
    write_native(study / "fundus_R.dcm", fundus_rgb("01_h"), patient_id="MRN-A", laterality="R")
    write_native(
        study / "volume.dcm",
        oct_volume(5),
        sop_class=OPT,
        modality="OPT",
        photometric="MONOCHROME2",
        patient_id="MRN-A",
        laterality="R",
    )
    (root / "PAT_B").mkdir()
    write_native(root / "PAT_B" / "IM000001", fundus_rgb("02_g"), patient_id="MRN-B", laterality="L")
    photos = root / "photos"
    photos.mkdir()
    Image.fromarray(fundus_rgb("03_dr")).save(photos / "camera_01.jpg", quality=95)
    Image.fromarray(fundus_rgb("04_h")).save(photos / "camera_02.png")
    (photos / "readme.txt").write_text("device export")
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    whole = (photos / "camera_01.jpg").read_bytes()
    (bad / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    (bad / "notes.jpg").write_text("not an image")
    write_native(
        bad / "angio.dcm", fundus_rgb("05_g"), extra={"SeriesDescription": "Fluorescein angiography"}
    )
    hidden = root / ".trash"
    hidden.mkdir()
    Image.fromarray(fundus_rgb()).save(hidden / "old.png")
    return root
