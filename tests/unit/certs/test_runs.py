"""Run bookkeeping of the coordinator: submissions by job name, complete rounds, exporting encoders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.ops.runs import RunRecord, RunRegistry, completed_rounds, export_encoders
from visionfm_core.errors import ConfigError
from visionfm_core.models.checkpoint import encoder_metadata, load_encoder, save_encoder
from visionfm_core.models.encoders import EncoderSpec


def _round(out: Path, server_round: int, complete: bool = True) -> Path:
    folder = out / "checkpoints" / f"round-{server_round:04d}"
    meta = encoder_metadata(EncoderSpec("nano", 32, 8), "fundus")
    save_encoder(folder / "fundus.safetensors", {"w": torch.full((2,), float(server_round))}, meta)
    save_encoder(folder / "fundus.head.safetensors", {"h": torch.zeros(1)}, {**meta, "part": "ssl-head"})
    if complete:
        (folder / "round.json").write_text("{}")
    return folder


def test_only_rounds_with_their_marker_count(tmp_path: Path) -> None:
    for server_round in (0, 1, 2):
        _round(tmp_path, server_round)
    _round(tmp_path, 3, complete=False)  # the coordinator died while writing it
    assert completed_rounds(tmp_path) == [0, 1, 2]


def test_registry_finds_the_latest_submission_of_a_job(tmp_path: Path) -> None:
    registry = RunRegistry(tmp_path)
    registry.add(RunRecord("fundus", 11, "/runs/fundus", 1.0))
    registry.add(RunRecord("oct", 12, "/runs/oct", 2.0))
    registry.add(RunRecord("fundus", 13, "/runs/fundus", 3.0, resumed_from=4))
    assert registry.find("fundus").run_id == 13
    assert registry.find("12").job == "oct"
    with pytest.raises(ConfigError, match="nope"):
        registry.find("nope")


def test_export_copies_encoders_not_ssl_heads(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _round(out, 1)
    with pytest.raises(ConfigError, match="latest complete round is 1"):
        export_encoders(out, tmp_path / "dest")
    copied = export_encoders(out, tmp_path / "dest", server_round=1)
    assert [p.name for p in copied] == ["fundus.safetensors"]
    state, meta = load_encoder(copied[0])
    assert meta["modality"] == "fundus" and torch.equal(state["w"], torch.full((2,), 1.0))
    with pytest.raises(ConfigError, match="round 5"):
        export_encoders(out, tmp_path / "dest", server_round=5)
