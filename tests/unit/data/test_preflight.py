"""check_site_data: counts what a site holds, names bad files locally, and sends only counts."""

from __future__ import annotations

import json
from pathlib import Path

import simulations
from visionfm_core.data.preflight import check_site_data

DATA = Path(simulations.__file__).parent / "data"


def test_report_on_a_mixed_site(mixed_site: Path) -> None:
    report = check_site_data(mixed_site, "fundus")
    # Decoding found the truncated JPEG whose header looked fine.
    unreadable = {Path(s.path).name: s.kind.value for s in report.unreadable}
    assert unreadable == {"empty.jpg": "empty_file", "notes.jpg": "not_an_image", "cut.jpg": "truncated"}
    assert sorted(Path(s.path).name for s in report.wrong_modality) == ["angio.dcm", "volume.dcm"]
    assert report.images_per_modality == {"fundus": 4} and report.decoded == 4
    assert report.laterality_counts == {"R": 1, "L": 1} and report.patients == 2
    assert report.ok  # bad and wrong-modality files are left out; the rest can train
    public = report.to_public_dict()
    assert public["unreadable_by_reason"] == {"empty_file": 1, "not_an_image": 1, "truncated": 1}
    assert public["wrong_modality_by_found"] == {"ffa": 1, "oct": 1}
    assert public["usable_images"] == 4 and public["files_indexed"] == 9


def test_public_dict_holds_no_paths_names_or_ids(mixed_site: Path) -> None:
    (mixed_site / "labels.csv").write_text(
        "path,label,patient_id\nPAT_A/study1/fundus_R.dcm,glaucoma,MRN-A\nphotos/camera_01.jpg,healthy,MRN-C\n"
    )
    report = check_site_data(mixed_site, "fundus")
    text = json.dumps(report.to_public_dict())
    forbidden = [
        str(mixed_site),
        "site",
        "PAT_A",
        "PAT_B",
        "MRN",
        "camera",
        "fundus_R",
        "IM000001",
        "glaucoma",
        "healthy",
        "notes",
        ".jpg",
        ".dcm",
        "/",
    ]
    assert [word for word in forbidden if word in text] == []
    assert report.to_public_dict()["images_per_class"] == {"0": 1, "1": 1}
    # The local console view names the files at fault.
    rendered = report.render()
    assert str(mixed_site / "bad" / "notes.jpg") in rendered and "glaucoma=1" in rendered


def test_real_sample_sets_pass(tmp_path: Path) -> None:
    oct_report = check_site_data(DATA / "oct2017_val", "oct")
    assert oct_report.ok and oct_report.usable_images == 32 and oct_report.decoded == 32
    assert oct_report.label_counts == {"CNV": 8, "DME": 8, "DRUSEN": 8, "NORMAL": 8}
    assert oct_report.patients == len(
        {line.split(",")[2] for line in (DATA / "oct2017_val" / "labels.csv").read_text().splitlines()[1:]}
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not check_site_data(empty, "fundus").ok
    hrf = check_site_data(DATA / "hrf", "fundus", decode=False)
    assert hrf.usable_images == 45 and hrf.decoded == 0
    # Masks beside the photographs have no row in labels.csv: reported, not silently used.
    assert len(hrf.label_problems) == 42 + 45
