from pathlib import Path

import pytest
import timm
import torch

from visionfm_core.errors import CheckpointError
from visionfm_core.models.checkpoint import (
    build_encoder_from_checkpoint,
    encoder_metadata,
    load_encoder,
    read_metadata,
    save_encoder,
)
from visionfm_core.models.encoders import EncoderSpec, create_encoder, encoder_state


def test_checkpoint_loads_strictly_into_plain_timm(tmp_path: Path) -> None:
    spec = EncoderSpec("nano", image_size=32, patch_size=8)
    encoder = create_encoder(spec)
    path = save_encoder(tmp_path / "fundus.safetensors", encoder_state(encoder),
                        encoder_metadata(spec, "Fundus", round=3, objective="ibot"))
    meta = read_metadata(path)
    assert meta["modality"] == "fundus" and meta["round"] == 3 and meta["objective"] == "ibot"
    assert meta["image_size"] == 32 and meta["patch_size"] == 8 and meta["mean"][0] == pytest.approx(0.4237)
    state, _ = load_encoder(path)
    model = timm.create_model(meta["timm_name"], **meta["timm_kwargs"])
    model.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    encoder.eval(), model.eval()
    torch.testing.assert_close(model(x), encoder(x))
    rebuilt, _ = build_encoder_from_checkpoint(path)
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in encoder.parameters())


def test_no_temporary_files_left_and_corrupt_files_are_named(tmp_path: Path) -> None:
    spec = EncoderSpec("nano", image_size=32, patch_size=8)
    save_encoder(tmp_path / "oct.safetensors", encoder_state(create_encoder(spec)), encoder_metadata(spec, "oct"))
    assert [p.name for p in tmp_path.iterdir()] == ["oct.safetensors"]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors"):
        load_encoder(bad)
