"""open_site: one entry point for folders (images and DICOM mixed), single files and .npz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import simulations
from visionfm_core.data.patients import group_key, split_by_patient
from visionfm_core.data.problems import ProblemKind
from visionfm_core.data.site import open_site, select_frames
from visionfm_core.errors import ConfigError, DataError

from .dicom_factory import OPT, fundus_rgb, oct_volume, write_native

DATA = Path(simulations.__file__).parent / "data"


def _by_kind(result_skipped: list, kind: ProblemKind) -> list[str]:
    return sorted(Path(s.path).name for s in result_skipped if s.kind is kind)


def test_fundus_site_mixes_dicom_and_images_and_reports_the_rest(mixed_site: Path) -> None:
    result = open_site(mixed_site, "fundus")
    names = sorted(Path(i.source).name for i in result.items)
    assert names == ["IM000001", "camera_01.jpg", "camera_02.png", "cut.jpg", "fundus_R.dcm"]
    assert all(i.modality == "fundus" for i in result.items)
    assert _by_kind(result.skipped, ProblemKind.WRONG_MODALITY) == ["angio.dcm", "volume.dcm"]
    assert {s.found_modality for s in result.skipped if s.kind is ProblemKind.WRONG_MODALITY} == {
        "ffa",
        "oct",
    }
    assert _by_kind(result.skipped, ProblemKind.EMPTY) == ["empty.jpg"]
    assert _by_kind(result.skipped, ProblemKind.NOT_AN_IMAGE) == ["notes.jpg"]
    dicom = next(i for i in result.items if i.source.endswith("IM000001"))
    assert dicom.laterality == "L" and dicom.frame == 0
    assert np.array_equal(dicom.load(), fundus_rgb("02_g"))
    assert result.class_names == []  # PACS folders are not class folders


def test_without_a_modality_dicom_tags_decide(mixed_site: Path) -> None:
    result = open_site(mixed_site)
    by_name: dict[str, set[str | None]] = {}
    for item in result.items:
        by_name.setdefault(Path(item.source).name, set()).add(item.modality)
    assert by_name["volume.dcm"] == {"oct"} and by_name["angio.dcm"] == {"ffa"}
    assert by_name["camera_01.jpg"] == {None}
    assert not [s for s in result.skipped if s.kind is ProblemKind.WRONG_MODALITY]


def test_override_tags_takes_the_site_modality(mixed_site: Path) -> None:
    result = open_site(mixed_site, "fundus", override_tags=True, slices="centre")
    volume = [i for i in result.items if i.source.endswith("volume.dcm")]
    assert [(i.modality, i.frame) for i in volume] == [("fundus", 2)]


@pytest.mark.parametrize(
    ("policy", "frames"),
    [("all", [0, 1, 2, 3, 4]), ("centre", [2]), ("every:2", [0, 2, 4]), ("every-3", [2])],
)
def test_oct_volume_slice_policies(mixed_site: Path, policy: str, frames: list[int]) -> None:
    result = open_site(mixed_site, "oct", slices=policy)
    volume = [i for i in result.items if i.source.endswith("volume.dcm")]
    assert [i.frame for i in volume] == frames
    expected = oct_volume(5)
    for item in volume:
        assert np.array_equal(item.load()[:, :, 0], expected[item.frame])


def test_select_frames() -> None:
    assert select_frames(7, "every:3") == [0, 3, 6]  # always includes the centre frame (3)
    assert select_frames(1, "centre") == [0] and select_frames(0, "all") == []
    with pytest.raises(ConfigError, match="slices"):
        select_frames(5, "every:0")
    with pytest.raises(ConfigError, match="slices"):
        open_site(DATA / "oct2017_val", "oct", slices="middle-ish")


def test_labels_csv_in_the_folder_is_used(tmp_path: Path) -> None:
    result = open_site(DATA / "oct2017_val", "oct")
    assert result.class_names == ["CNV", "DME", "DRUSEN", "NORMAL"]
    assert len(result.items) == 32 and not result.skipped
    first = result.items[0]
    assert "CNV" in first.source and result.class_names[first.label or 0] == "CNV"
    # Patient IDs from the CSV are hashed: both scans of patient 6294785 share a key that hides it.
    keys = {i.patient_key or "" for i in result.items if "6294785" in i.source}
    assert len(keys) == 1 and "6294785" not in next(iter(keys)) and "" not in keys


def test_labels_csv_with_dicom_and_missing_rows(mixed_site: Path) -> None:
    (mixed_site / "labels.csv").write_text(
        "path,label,patient_id\n"
        "PAT_A/study1/fundus_R.dcm,glaucoma,A\n"
        "PAT_A/study1/volume.dcm,healthy,A\n"
        "photos/camera_01.jpg,healthy,C\n"
        "photos/gone.jpg,glaucoma,D\n"
    )
    result = open_site(mixed_site, "oct", override_tags=True)
    labels = {(Path(i.source).name, result.class_names[i.label]) for i in result.items if i.label is not None}
    assert labels == {("fundus_R.dcm", "glaucoma"), ("volume.dcm", "healthy"), ("camera_01.jpg", "healthy")}
    assert len([i for i in result.items if i.source.endswith("volume.dcm")]) == 5
    assert "camera_02.png" in _by_kind(result.skipped, ProblemKind.NO_LABEL_ROW)
    assert _by_kind(result.skipped, ProblemKind.FILE_NOT_FOUND) == ["gone.jpg"]


def test_class_folders_give_labels(tmp_path: Path) -> None:
    result = open_site(DATA / "oct2017_val" / "val", "oct")
    assert result.class_names == ["CNV", "DME", "DRUSEN", "NORMAL"]
    assert sorted({result.class_names[i.label or 0] for i in result.items}) == result.class_names


def test_single_files_and_npz(tmp_path: Path) -> None:
    volume = write_native(
        tmp_path / "v.dcm", oct_volume(3), sop_class=OPT, modality="OPT", photometric="MONOCHROME2"
    )
    assert [i.frame for i in open_site(volume, "oct").items] == [0, 1, 2]
    wrong = open_site(volume, "fundus")
    assert not wrong.items and wrong.skipped[0].kind is ProblemKind.WRONG_MODALITY
    npz = open_site(DATA / "retinamnist" / "retinamnist.npz", "fundus", split="val")
    assert len(npz.items) == 120 and npz.class_names == ["0", "1", "2", "3", "4"]
    with pytest.raises(DataError, match="not found"):
        open_site(tmp_path / "nowhere", "fundus")


def test_split_by_patient_never_leaks_a_patient(tmp_path: Path) -> None:
    items = open_site(DATA / "oct2017_val", "oct").items
    parts = split_by_patient(items, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=3)
    assert sum(len(p) for p in parts.values()) == len(items)
    owners: dict[str, str] = {}
    for name, part in parts.items():
        for item in part:
            assert owners.setdefault(group_key(item), name) == name
    assert all(parts[n] for n in parts)
    assert split_by_patient(items, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=3) == parts


def test_volume_frames_stay_together_without_patient_ids(tmp_path: Path) -> None:
    for n in range(6):
        write_native(
            tmp_path / f"v{n}.dcm",
            oct_volume(4),
            sop_class=OPT,
            modality="OPT",
            photometric="MONOCHROME2",
            patient_id="",
        )
    items = open_site(tmp_path, "oct").items
    assert len(items) == 24 and all(i.patient_key is None for i in items)
    parts = split_by_patient(items, {"train": 0.5, "test": 0.5})
    train_files = {i.source for i in parts["train"]}
    assert train_files.isdisjoint({i.source for i in parts["test"]}) and len(parts["train"]) % 4 == 0
