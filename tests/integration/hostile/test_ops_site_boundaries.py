"""Hostile replay: a site's data folder and task manifest pointing outside it. `visionfm-client check`
(online, against a real coordinator) must name what it refuses, never count or open it, and refuse a
task manifest that names /etc/passwd."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.integration.deployment.conftest import CoordinatorHandle, Federation
from tests.integration.hostile._ops_support import cli, coordinator_fixture, federation_fixture, processes_fixture  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _png(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((48, 48, 3), value, np.uint8)).save(path)
    return path


def test_check_refuses_links_out_of_the_folder_and_a_manifest_naming_etc_passwd(
    coordinator: CoordinatorHandle, federation: Federation, tmp_path: Path
) -> None:
    data = tmp_path / "site"
    for i in range(4):
        _png(data / f"img-{i}.png", 40 * i)
    _png(data / "mask.png", 255)
    os.symlink(_png(tmp_path / "other-department" / "scan.png", 90), data / "borrowed.png")
    os.symlink("/etc/passwd", data / "passwd.png")
    common = ["check", "--bundle", str(federation.bundle("hospital-a")), "--data", str(data), "--modalities",
              "fundus", "--work", str(tmp_path / "work"), "--gpu", "-1"]
    env_state = {"VISIONFM_STATE_DIR": str(tmp_path / "state")}
    os.environ.update(env_state)
    try:
        plain = cli("client.cli", *common)
        print(plain.stdout)
        assert plain.returncode == 0, plain.stdout  # usable images remain: READY, with the refusals named
        assert "5 usable image(s)" in plain.stdout
        assert "2 link(s) to files outside the data folder refused" in plain.stdout
        assert "passwd.png: resolves" in plain.stdout and "borrowed.png: resolves" in plain.stdout
        assert "root:" not in plain.stdout  # nothing of /etc/passwd was read
        manifest = data / "seg.csv"
        manifest.write_text("image,mask\nimg-0.png,mask.png\nimg-1.png,/etc/passwd\n")
        tasked = cli("client.cli", *common, "--task-manifest", str(manifest), "--task", "segmentation")
        print(tasked.stdout)
        assert tasked.returncode == 1 and "NOT READY" in tasked.stdout
        assert "/etc/passwd: outside the data folder" in tasked.stdout
    finally:
        os.environ.pop("VISIONFM_STATE_DIR", None)
