"""Exports load in timm offline and in VisionFM's layout, and re-import exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch

from tests.unit.tasks.helpers import single_torch_thread, tiny_encoder  # noqa: F401  (autouse fixture)
from visionfm_core.models.checkpoint import encoder_metadata
from visionfm_core.models.encoders import EncoderSpec
from visionfm_core.models.exporters import export_timm_folder, export_visionfm
from visionfm_core.models.importers import import_encoder


def test_timm_folder_loads_with_timm_alone(tmp_path: Path) -> None:
    encoder = tiny_encoder(32).eval()
    meta = encoder_metadata(EncoderSpec("nano", 32), "oct")
    folder = export_timm_folder(encoder.state_dict(), meta, tmp_path / "export")
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors"}
    model: Any = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(images), encoder(images))
    assert tuple(model.pretrained_cfg["mean"]) == (0.2109, 0.2109, 0.2109)


def test_visionfm_layout_opens_without_trust_and_round_trips(tmp_path: Path) -> None:
    encoder = tiny_encoder(32)
    path = export_visionfm(encoder.state_dict(), tmp_path / "VFM_OCT_weights.pth")
    raw = torch.load(path, weights_only=True)
    assert "backbone.pos_embed" in raw["teacher"] and "module.backbone.pos_embed" in raw["student"]
    result = import_encoder(path, "oct")
    assert result.source_format == "visionfm"
    assert all(torch.equal(result.state[k], v) for k, v in encoder.state_dict().items())
