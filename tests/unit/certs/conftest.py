"""A provisioned federation in a temporary folder (real keys and certificates, issued once per module)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from certs.provision import issue
from certs.store import CertStore

PARTICIPANTS = """
[federation]
name = "eye-consortium"
validity-days = 90

[coordinator]
address = "fl.example.org:9443"
extra-sans = ["10.0.0.5"]

[[hospital]]
name = "hospital-a"

[[hospital]]
name = "hospital-b"
"""


def write_participants(folder: Path, text: str = PARTICIPANTS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "participants.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def issued_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("issued")
    issue(write_participants(root / "input"), root / "pki")
    return root / "pki"


@pytest.fixture
def store(issued_once: Path, tmp_path: Path) -> CertStore:
    """A private copy of the issued folder that a test may change (permissions preserved)."""
    target = tmp_path / "pki"
    shutil.copytree(issued_once, target)
    return CertStore(target)
