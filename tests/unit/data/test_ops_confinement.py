"""A site reads nothing outside its data folder: links out of it are refused by name before anything
is opened, and a task manifest may only name images inside the allowed folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.preflight import check_data, check_task_manifest
from client.site import read_task_manifests
from visionfm_core.data.index import index_site
from visionfm_core.data.problems import ProblemKind
from visionfm_core.data.site import open_site
from visionfm_core.errors import DataError


def _png(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 40, 3), value, np.uint8)).save(path)
    return path


@pytest.fixture
def site(tmp_path: Path) -> Path:
    data = tmp_path / "site"
    _png(data / "a.png")
    _png(data / "b.png", 60)
    outside = _png(tmp_path / "elsewhere" / "private.png", 200)
    os.symlink(outside, data / "linked-out.png")
    os.symlink("/etc/passwd", data / "passwd.png")
    os.symlink(data / "a.png", data / "linked-in.png")
    (data / "sub").mkdir()
    os.symlink("../../elsewhere/private.png", data / "sub" / "dotdot.png")
    return data


def test_links_out_of_the_folder_are_refused_by_name_without_being_read(site: Path, tmp_path: Path) -> None:
    index = index_site(site, tmp_path / "state")
    refused = {e.path: e for e in index.problems()}
    assert set(refused) == {"linked-out.png", "passwd.png", "sub/dotdot.png"}
    assert all(e.problem == ProblemKind.OUTSIDE_DATA_FOLDER.value for e in refused.values())
    assert all("outside the data folder" in (e.reason or "") for e in refused.values())
    # The link's own stat, never its target's: nothing of /etc/passwd was looked at.
    assert refused["passwd.png"].size == len("/etc/passwd")
    assert {e.path for e in index.usable()} == {"a.png", "b.png", "linked-in.png"}


def test_training_never_gets_files_from_outside(site: Path, tmp_path: Path) -> None:
    scan = open_site(site, "fundus", state_dir=tmp_path / "state")
    sources = {Path(i.source).name for i in scan.items}
    assert sources == {"a.png", "b.png", "linked-in.png"}
    assert {Path(s.path).name for s in scan.skipped} == {"linked-out.png", "passwd.png", "dotdot.png"}


def test_check_names_the_refused_links(site: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VISIONFM_STATE_DIR", str(tmp_path / "state"))
    (check,) = check_data(site, ["fundus"])
    assert "3 link(s) to files outside the data folder refused" in check.message
    assert any("passwd.png" in line and "outside the data folder" in line for line in check.details)


def test_labels_csv_linked_from_outside_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "site"
    _png(data / "x" / "a.png")
    (tmp_path / "labels.csv").write_text("path,label\nx/a.png,x\n")
    os.symlink(tmp_path / "labels.csv", data / "labels.csv")
    with pytest.raises(DataError, match="outside the data folder"):
        open_site(data, "fundus", state_dir=tmp_path / "state")


def _manifest(folder: Path, rows: list[tuple[str, str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "seg.csv"
    path.write_text("image,mask\n" + "".join(f"{image},{mask}\n" for image, mask in rows))
    return path


def test_manifest_naming_etc_passwd_is_refused_by_check_and_training(tmp_path: Path) -> None:
    data = tmp_path / "site"
    _png(data / "img.png")
    _png(data / "mask.png", 255)
    good = _manifest(data, [("img.png", "mask.png")])
    assert check_task_manifest(str(good), "segmentation", ["fundus"], data)[0].verdict == "ok"
    bad = _manifest(tmp_path / "manifests", [("../site/img.png", "/etc/passwd")])
    (check,) = check_task_manifest(str(bad), "segmentation", ["fundus"], data)
    assert check.verdict == "fail" and any("/etc/passwd" in line and "refused" in line for line in check.details)
    with pytest.raises(DataError, match="/etc/passwd"):
        read_task_manifests(str(bad), "segmentation", ["fundus"], data_path=data)


def test_manifest_files_must_be_images(tmp_path: Path) -> None:
    data = tmp_path / "site"
    _png(data / "img.png")
    (data / "notes.png").write_text("not an image at all")
    manifest = _manifest(data, [("img.png", "notes.png")])
    (check,) = check_task_manifest(str(manifest), "segmentation", ["fundus"], data)
    assert check.verdict == "fail" and any("notes.png: is not an image" in line for line in check.details)


def test_a_modality_folder_linked_from_outside_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "site"
    _png(data / "oct" / "a.png")
    _png(tmp_path / "elsewhere" / "b.png")
    os.symlink(tmp_path / "elsewhere", data / "fundus")
    checks = {c.name: c for c in check_data(data, ["fundus", "oct"])}
    assert checks["data:fundus"].verdict == "fail" and "outside the data folder" in checks["data:fundus"].message
    assert checks["data:oct"].verdict == "ok"
