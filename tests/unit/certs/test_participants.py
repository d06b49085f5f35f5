from __future__ import annotations

from pathlib import Path

import pytest

from certs.participants import load_participants, split_address
from tests.unit.certs.conftest import PARTICIPANTS, write_participants
from visionfm_core.errors import ConfigError


def test_participants_file_is_parsed(tmp_path: Path) -> None:
    participants = load_participants(write_participants(tmp_path))
    assert participants.federation == "eye-consortium"
    assert (participants.coordinator.host, participants.coordinator.port) == ("fl.example.org", 9443)
    assert participants.coordinator.extra_sans == ("10.0.0.5",)
    assert [h.name for h in participants.hospitals] == ["hospital-a", "hospital-b"]
    assert participants.leaf_validity_days == 90


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("fl.example.org:9443", ("fl.example.org", 9443)),
        ("10.1.2.3:1", ("10.1.2.3", 1)),
        ("[2001:db8::1]:443", ("2001:db8::1", 443)),
    ],
)
def test_addresses_split(address: str, expected: tuple[str, int]) -> None:
    assert split_address(address) == expected


@pytest.mark.parametrize("address", ["fl.example.org", "host:0", "host:70000", "a b:1", ":9443"])
def test_bad_addresses_name_the_key(address: str) -> None:
    with pytest.raises(ConfigError) as err:
        split_address(address)
    assert err.value.key == "coordinator.address"


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda t: t.replace('address = "fl.example.org:9443"', 'address = "fl.example.org"'), "coordinator.address"),
        (lambda t: t.replace('name = "hospital-b"', 'name = "hospital-a"'), "hospital[1].name"),
        (lambda t: t.replace('name = "hospital-b"', 'name = "Hospital B"'), "hospital[1].name"),
        (lambda t: t.replace("validity-days = 90", "validity-days = 0"), "federation.validity-days"),
        (lambda t: t + "\n[extra]\nx = 1\n", "extra"),
        (lambda t: t.split("[[hospital]]")[0], "hospital"),
        (lambda t: t.replace('[coordinator]\naddress = "fl.example.org:9443"', ""), "coordinator"),
    ],
)
def test_invalid_files_name_the_key(tmp_path: Path, edit: object, key: str) -> None:
    assert callable(edit)
    path = write_participants(tmp_path, edit(PARTICIPANTS))
    with pytest.raises(ConfigError) as err:
        load_participants(path)
    assert err.value.key == key


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_participants(tmp_path / "nope.toml")
