"""Heads read the right blocks and give the right shapes for any input size and patch size."""

from __future__ import annotations

import pytest
import torch

from tests.unit.tasks.helpers import single_torch_thread, tiny_encoder  # noqa: F401  (autouse fixture)
from visionfm_core.errors import ConfigError
from visionfm_core.models.heads import (
    CenterNetHead,
    HeatmapHead,
    LinearHead,
    ProbeHead,
    TaskModel,
    UNETRHead,
    build_head,
    encode,
    encoder_dims,
    last_blocks,
    spread_blocks,
)


def test_block_selection_matches_unetr_and_visionfm() -> None:
    assert spread_blocks(12, 4) == (2, 5, 8, 11)  # UNETR's blocks 3, 6, 9, 12
    assert last_blocks(12, 4) == (8, 9, 10, 11)
    assert spread_blocks(2, 4) == (0, 0, 1, 1) and last_blocks(2, 4) == (0, 1)


def test_encode_returns_cls_and_maps_of_requested_blocks_for_non_square_input() -> None:
    encoder = tiny_encoder(64)
    features = encode(encoder, torch.randn(2, 3, 48, 80), [1, 0])
    assert set(features.cls) == {0, 1}
    assert features.cls[1].shape == (2, 32) and features.maps[0].shape == (2, 32, 3, 5)
    with torch.no_grad():
        pooled = encoder(torch.randn(1, 3, 48, 80))
    assert pooled.shape == (1, 32)


def test_probe_concatenates_last_blocks_and_matches_visionfm_widths() -> None:
    head = ProbeHead(embed_dim=768, depth=12, num_outputs=5)
    widths = [m.out_features for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert head.mlp[0].num_features == 3072 and widths == [1536, 768, 5]


@pytest.mark.parametrize(("patch", "size"), [(16, 64), (8, 40), (14, 56)])
def test_unetr_outputs_logits_at_input_resolution(patch: int, size: int) -> None:
    encoder = tiny_encoder(size, patch_size=patch)
    embed_dim, depth, patch_size = encoder_dims(encoder)
    assert patch_size == patch
    model = TaskModel(encoder, UNETRHead(embed_dim, depth, num_classes=3, features=4, patch_size=patch))
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 3, size, size)


def test_unetr_accepts_a_larger_input_than_it_was_built_for() -> None:
    encoder = tiny_encoder(32)
    model = TaskModel(encoder, UNETRHead(32, 2, num_classes=2, features=4))
    assert model(torch.randn(1, 3, 96, 64)).shape == (1, 2, 96, 64)  # position embedding resampled


def test_heatmap_and_centernet_strides() -> None:
    encoder = tiny_encoder(64)
    heat = TaskModel(encoder, HeatmapHead(32, 2, num_points=3, channels=8))(torch.randn(1, 3, 64, 64))
    assert heat.shape == (1, 3, 16, 16)  # stride 4 for patch 16
    boxes = TaskModel(encoder, CenterNetHead(32, 2, num_classes=2, channels=8))(torch.randn(1, 3, 64, 64))
    assert boxes["heatmap"].shape == (1, 2, 8, 8) and boxes["size"].shape == (1, 2, 8, 8)
    offsets = boxes["offset"].detach()
    assert float(offsets.min()) >= 0.0 and float(offsets.max()) <= 1.0


def test_frozen_model_keeps_encoder_out_of_autograd_and_in_eval_mode() -> None:
    head = LinearHead(32, 2, num_outputs=4)
    model = TaskModel(tiny_encoder(32), head, freeze_encoder=True)
    model.train()
    assert not model.encoder.training and model.head.training
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert head.fc.weight.grad is not None


def test_heads_rebuild_from_their_config() -> None:
    for head in (
        ProbeHead(32, 2, 3),
        LinearHead(32, 2, 3, 0.1),
        UNETRHead(32, 2, 2, 4, 8),
        HeatmapHead(32, 2, 1, 8),
        CenterNetHead(32, 2, 1, 8),
    ):
        rebuilt = build_head(head.kind, head.config)
        assert type(rebuilt) is type(head)
        assert rebuilt.state_dict().keys() == head.state_dict().keys()
    with pytest.raises(ConfigError, match="head"):
        build_head("mystery", {})
    with pytest.raises(ConfigError, match="does not fit"):
        build_head("probe", {"embed_dim": 4})
