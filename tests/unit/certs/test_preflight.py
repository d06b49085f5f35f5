"""`visionfm-client check` on real image files and a real bundle (offline: no coordinator here)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import simulations
from certs.store import CertStore
from client.cli import app
from tests.csv_files import write_csv

OCT = Path(simulations.__file__).parent / "data" / "oct2017_val" / "val" / "CNV"


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images" / "CNV"
    folder.mkdir(parents=True)
    sources = sorted(OCT.iterdir())[:2]
    for source in sources:
        shutil.copy(source, folder / source.name)
    (folder / "broken.jpeg").write_bytes(sources[0].read_bytes()[:400])  # a truncated JPEG
    return folder.parent


def _check(bundle: Path | None, data: Path, work: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        app,
        [
            "check",
            *(["--bundle", str(bundle)] if bundle is not None else []),
            "--data",
            str(data),
            "--modalities",
            "oct",
            "--work",
            str(work),
            "--offline",
            "--gpu",
            "-1",
            *extra,
        ],
    )
    return result.exit_code, result.output  # lines are never wrapped or cut, whatever the terminal width


def test_ready_site_lists_its_unreadable_files(store: CertStore, images: Path, tmp_path: Path) -> None:
    code, output = _check(store.bundle_dir("hospital-a"), images, tmp_path / "work")
    assert code == 0, output
    assert "2 usable image(s) (oct 2)" in output
    assert f"{images / 'CNV' / 'broken.jpeg'}: " in output and "1 unreadable" in output
    assert "bundle of hospital-a for fl.example.org:9443" in output
    assert "READY" in output


def test_a_long_path_is_printed_whole_whatever_the_width(store: CertStore, images: Path, tmp_path: Path) -> None:
    deep = tmp_path / ("a-very-long-folder-name-of-a-hospital-export-" * 4) / "images"
    shutil.copytree(images, deep)
    broken = deep / "CNV" / "broken.jpeg"
    assert len(str(broken)) > 200  # longer than any console line
    for columns in ("40", "80", "400"):
        result = CliRunner(env={"COLUMNS": columns}).invoke(
            app, ["check", "--data", str(deep), "--modalities", "oct", "--work", str(tmp_path / "work"),
                  "--offline", "--gpu", "-1"])
        lines = result.output.splitlines()
        assert any(line.strip().startswith(f"{broken}: ") for line in lines), result.output


def test_a_data_only_check_needs_no_certificates(images: Path, tmp_path: Path) -> None:
    code, output = _check(None, images, tmp_path / "work")
    assert code == 0, output
    assert "2 usable image(s) (oct 2)" in output
    assert "SKIP bundle: no --bundle given: certificate and coordinator checks skipped" in output
    assert "READY" in output
    online = CliRunner().invoke(app, ["check", "--data", str(images), "--modalities", "oct", "--gpu", "-1"])
    assert online.exit_code == 2 and "--bundle is required unless --offline" in online.output


def test_missing_data_and_a_readable_key_fail_the_check(store: CertStore, tmp_path: Path) -> None:
    bundle = store.bundle_dir("hospital-a")
    os.chmod(bundle / "client.key", 0o644)
    code, output = _check(bundle, tmp_path / "nowhere", tmp_path / "work")
    assert code == 1
    assert "does not exist" in output
    assert "chmod 600" in output
    assert "NOT READY" in output


def test_bundle_for_another_coordinator_fails(store: CertStore, images: Path, tmp_path: Path) -> None:
    code, output = _check(store.bundle_dir("hospital-a"), images, tmp_path / "work", "--coordinator", "other:1")
    assert code == 1
    assert "differs" in output


def _segmentation_manifest(folder: Path, images: Path, masks: int) -> Path:
    """A site's vessel manifest over its OCT files (any image works), `masks` of which have a mask."""
    from PIL import Image

    rows = []
    for index, image in enumerate(sorted((images / "CNV").glob("*.jpeg"))[:2]):
        mask = folder / f"mask{index}.png"
        if index < masks:
            with Image.open(image) as opened:
                Image.new("L", opened.size).save(mask)
        rows.append({"image": str(image), "mask": mask.name})
    return write_csv(folder / "vessels.csv", rows)


def test_a_task_manifest_is_checked_and_a_missing_mask_fails(store: CertStore, images: Path, tmp_path: Path) -> None:
    bundle = store.bundle_dir("hospital-a")
    complete = _segmentation_manifest(tmp_path, images, masks=2)
    code, output = _check(bundle, images, tmp_path / "work", "--task-manifest", str(complete))
    assert code == 0 and "task:oct: 2 segmentation samples" in output, output
    partial = _segmentation_manifest(tmp_path, images, masks=1)
    (tmp_path / "mask1.png").unlink()
    code, output = _check(bundle, images, tmp_path / "work", "--task-manifest", str(partial))
    assert code == 1 and "1 file(s) named in the segmentation manifest do not exist" in output
    assert "mask1.png" in output  # named on the local console only
    code, output = _check(bundle, images, tmp_path / "work", "--task-manifest", str(tmp_path / "none.csv"))
    assert code == 1 and "manifest not found" in output


def test_a_mask_of_another_size_or_unreadable_fails_naming_the_pair(images: Path, tmp_path: Path) -> None:
    from PIL import Image

    manifest = _segmentation_manifest(tmp_path, images, masks=2)
    first, second = sorted((images / "CNV").glob("*.jpeg"))[:2]
    Image.new("L", (999, 960)).save(tmp_path / "mask0.png")  # the HRF/DRIVE mix-up of the issue
    (tmp_path / "mask1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, output = _check(None, images, tmp_path / "work", "--task-manifest", str(manifest))
    assert code == 1, output
    assert "FAIL task:oct: 2 of 2 image/mask pair(s) cannot be used" in output
    with Image.open(first) as opened:
        width, height = opened.size
    assert f"mask {tmp_path / 'mask0.png'} is 999x960 but its image {first} is {width}x{height}" in output
    assert f"mask {tmp_path / 'mask1.png'} of image {second} is unreadable" in output
    assert "NOT READY" in output
