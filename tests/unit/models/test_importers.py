"""Importing VisionFM and RETFound checkpoints built in the exact upstream layouts."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from torch import nn

from tests.unit.tasks.helpers import single_torch_thread, tiny_encoder  # noqa: F401  (autouse fixture)
from visionfm_core.errors import CheckpointError
from visionfm_core.models.importers import (
    IMAGENET_MEAN,
    detect_format,
    import_encoder,
    load_checkpoint,
    unsafe_globals,
)

X = torch.randn(2, 3, 32, 32)


def _same_outputs(a: nn.Module, b: nn.Module, images: torch.Tensor = X) -> bool:
    a.eval(), b.eval()
    with torch.no_grad():
        return torch.allclose(a(images), b(images), atol=1e-5)


def _rebuild(result_meta: dict, state: dict) -> nn.Module:
    model = timm.create_model(result_meta["timm_name"], **result_meta["timm_kwargs"])
    model.load_state_dict(state, strict=True)
    return model


def visionfm_file(path: Path, encoder: nn.Module) -> Path:
    """A pretraining save exactly as VisionFM's iBOT code writes it (student wrapped in DDP)."""
    state = encoder.state_dict()
    head = {
        "mlp.0.weight": torch.randn(16, 32),
        "mlp.0.bias": torch.zeros(16),
        "last_layer.weight_g": torch.ones(64, 1),
        "last_layer.weight_v": torch.randn(64, 16),
    }
    torch.save(
        {
            "student": {
                **{f"module.backbone.{k}": v.clone() for k, v in state.items()},
                "module.backbone.masked_embed": torch.zeros(1, 32),
                **{f"module.head.{k}": v for k, v in head.items()},
            },
            "teacher": {
                **{f"backbone.{k}": v.clone() for k, v in state.items()},
                **{f"head.{k}": v for k, v in head.items()},
            },
            "optimizer": {
                "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                "param_groups": [{"lr": 1e-4, "weight_decay": 0.04, "params": [0]}],
            },
            "epoch": 400,
            "args": argparse.Namespace(
                arch="vit_base",
                patch_size=16,
                out_dim=8192,
                lr=7.5e-5,
                data_path="/data",
                global_crops_scale=(0.32, 1.0),
                pred_ratio=[0.0, 0.3],
            ),
            "ibot_loss": {"center": torch.zeros(1, 64), "center2": torch.zeros(1, 1, 64)},
            "fp16_scaler": {
                "scale": 65536.0,
                "growth_factor": 2.0,
                "backoff_factor": 0.5,
                "growth_interval": 2000,
                "_growth_tracker": 17,
            },
        },
        path,
    )
    return path


def test_visionfm_pretraining_checkpoint_imports_exactly(tmp_path: Path) -> None:
    encoder = tiny_encoder(32)
    path = visionfm_file(tmp_path / "VFM_Fundus_weights.pth", encoder)
    assert unsafe_globals(path) == []  # Namespace and plain data only: no trust needed
    result = import_encoder(path, "fundus")
    assert result.source_format == "visionfm" and result.metadata["arch"] == "nano"
    assert any(k.startswith("head.") for k in result.dropped_keys)
    assert result.metadata["mean"] == pytest.approx([0.4237, 0.2609, 0.1284])
    assert _same_outputs(_rebuild(result.metadata, result.state), encoder)


def test_position_embedding_is_resampled_for_another_size(tmp_path: Path) -> None:
    encoder = tiny_encoder(32)
    result = import_encoder(visionfm_file(tmp_path / "v.pth", encoder), "fundus", image_size=64)
    assert result.state["pos_embed"].shape == (1, 17, 32) and result.source_image_size == 32
    model = _rebuild(result.metadata, result.state)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 32)
    # The [CLS] position is carried over unchanged.
    assert torch.equal(result.state["pos_embed"][:, 0], encoder.state_dict()["pos_embed"][:, 0])


def test_retfound_mae_checkpoint_drops_the_decoder(tmp_path: Path) -> None:
    encoder = tiny_encoder(32)
    decoder = {
        "decoder_embed.weight": torch.randn(16, 32),
        "decoder_pos_embed": torch.randn(1, 5, 16),
        "decoder_blocks.0.norm1.weight": torch.ones(16),
        "decoder_norm.weight": torch.ones(16),
        "decoder_pred.weight": torch.randn(768, 16),
        "mask_token": torch.zeros(1, 1, 16),
    }
    torch.save(
        {
            "model": {**encoder.state_dict(), **decoder},
            "epoch": 799,
            "scaler": {"scale": 1024.0},
            "args": argparse.Namespace(model="mae_vit_large_patch16", norm_pix_loss=True),
        },
        tmp_path / "RETFound_cfp_weights.pth",
    )
    result = import_encoder(tmp_path / "RETFound_cfp_weights.pth", "fundus")
    assert result.source_format == "retfound_mae" and len(result.dropped_keys) == len(decoder)
    assert tuple(result.metadata["mean"]) == IMAGENET_MEAN  # RETFound was trained on ImageNet statistics
    assert _same_outputs(_rebuild(result.metadata, result.state), encoder)


def _dinov2_reference(swiglu: bool) -> nn.Module:
    name = "vit_giant_patch14_dinov2" if swiglu else "vit_large_patch14_dinov2"
    extra: dict[str, Any] = {"mlp_ratio": 2.75} if swiglu else {}
    return timm.create_model(
        name,
        pretrained=False,
        num_classes=0,
        img_size=28,
        patch_size=14,
        embed_dim=32,
        depth=2,
        num_heads=2,
        **extra,
    )


@pytest.mark.parametrize("swiglu", [False, True])
def test_retfound_dinov2_teacher_with_chunks_and_swiglu(tmp_path: Path, swiglu: bool) -> None:
    reference = _dinov2_reference(swiglu)
    blocks: Any = reference.blocks
    for block in blocks:  # layer scale away from its init, so a dropped gamma would show
        block.ls1.gamma.data.uniform_(0.5, 1.5)
    teacher = {}
    for key, value in reference.state_dict().items():
        key = key.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.") if swiglu else key
        key = key.replace("blocks.", "blocks.0.", 1) if key.startswith("blocks.") else key  # one FSDP chunk
        teacher[f"backbone.{key}"] = value.clone()
    teacher.update(
        {
            "backbone.mask_token": torch.zeros(1, 32),
            "dino_head.mlp.0.weight": torch.randn(8, 32),
            "ibot_head.mlp.0.weight": torch.randn(8, 32),
        }
    )
    torch.save({"teacher": teacher}, tmp_path / "RETFound_dinov2_meh.pth")
    result = import_encoder(tmp_path / "RETFound_dinov2_meh.pth", "fundus")
    assert result.source_format == "retfound_dinov2" and result.metadata["patch_size"] == 14
    assert _same_outputs(_rebuild(result.metadata, result.state), reference, torch.randn(2, 3, 28, 28))


class Payload:
    """Anything outside the allow-list; its unpickling would call ``Path.touch``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_arbitrary_objects_are_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    torch.save({"model": tiny_encoder().state_dict(), "extra": Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil.pth: refused to unpickle: it needs .*pathlib.Path.*trust"):
        import_encoder(tmp_path / "evil.pth", "fundus")
    assert not marker.exists()
    assert any("Path" in name for name in unsafe_globals(tmp_path / "evil.pth"))
    loaded = load_checkpoint(tmp_path / "evil.pth", trust=True)  # the user vouches for the file
    assert marker.exists() and "model" in loaded


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "broken.pth").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match=r"broken\.pth: not a readable torch checkpoint"):
        import_encoder(tmp_path / "broken.pth", "fundus")
    with pytest.raises(CheckpointError, match=r"missing\.pth: file not found"):
        import_encoder(tmp_path / "missing.pth", "fundus")
    torch.save({"model": {"foo.weight": torch.zeros(2)}}, tmp_path / "notvit.pth")
    with pytest.raises(CheckpointError, match=r"notvit\.pth: not a ViT encoder"):
        import_encoder(tmp_path / "notvit.pth", "fundus")


def test_format_detection() -> None:
    assert detect_format({"teacher": {"backbone.cls_token": torch.zeros(1)}}) == "visionfm"
    assert detect_format({"teacher": {"backbone.blocks.0.ls1.gamma": torch.zeros(1)}}) == "retfound_dinov2"
    assert detect_format({"model": {"decoder_pred.weight": torch.zeros(1)}}) == "retfound_mae"
    assert detect_format({"cls_token": torch.zeros(1)}) == "timm"
