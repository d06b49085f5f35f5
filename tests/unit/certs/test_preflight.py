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


def _check(bundle: Path, data: Path, work: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        app,
        [
            "check",
            "--bundle",
            str(bundle),
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
    return result.exit_code, " ".join(result.output.split())  # the console wraps long lines


def test_ready_site_lists_its_unreadable_files(store: CertStore, images: Path, tmp_path: Path) -> None:
    code, output = _check(store.bundle_dir("hospital-a"), images, tmp_path / "work")
    assert code == 0, output
    assert "2 usable image(s) (oct 2)" in output
    assert "broken.jpeg" in output and "1 unreadable" in output
    assert "bundle of hospital-a for fl.example.org:9443" in output
    assert "READY" in output


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
            Image.new("L", (32, 32)).save(mask)
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
