"""ssl/blocks.py: timm's ViT blocks with fewer memory passes give timm's outputs and gradients.

Tolerance: the fast path regroups one sum per residual branch, x + (h @ W^T + b) as (x + b) + h @ W^T,
so values differ from timm's by float32 rounding only (a few ulps per block; the 12-block ViT-Ti/8
measured 2.4e-6 at most on its outputs). rtol = atol = 1e-5 on these 2-block models is 10-100x that
and far below any real error (a dropped bias or residual moves values by O(0.1)).
"""

from __future__ import annotations

import pytest
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn

from visionfm_core.models.encoders import EncoderSpec, create_encoder
from visionfm_core.ssl.blocks import _plain_block, block_forward, blocks_forward
from visionfm_core.ssl.head import ProjectionHead
from visionfm_core.ssl.network import SSLNetwork, set_fused_attention

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _outputs_and_grads(run: object, module: nn.Module, x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, ...]:
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same stochastic-depth draws for both runs
    out = run(x)  # type: ignore[operator]
    # A loss that weighs every output element differently, so a permuted or misplaced gradient shows.
    out.mul(torch.linspace(-1.0, 2.0, out.numel()).view_as(out)).sum().backward()
    assert x.grad is not None
    return (out.detach(), x.grad, *(p.grad for p in module.parameters() if p.grad is not None))


def _assert_same(module: nn.Module, fast: object, reference: object, x: torch.Tensor) -> None:
    got = _outputs_and_grads(fast, module, x)
    expected = _outputs_and_grads(reference, module, x)
    assert len(got) == len(expected) == 2 + sum(1 for p in module.parameters() if p.requires_grad)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_the_encoders_blocks_take_the_fast_path_and_match_timm() -> None:
    torch.manual_seed(0)
    encoder = create_encoder(EncoderSpec("nano", 32, 8))
    blocks = encoder.blocks
    assert all(_plain_block(b) for b in blocks), "timm's ViT block no longer matches the fast path"
    x = torch.randn(3, 17, 32)  # [CLS] + 16 patches
    _assert_same(blocks, lambda t: blocks_forward(blocks, t), blocks, x)


def test_stochastic_depth_keeps_timms_draws() -> None:
    torch.manual_seed(0)
    encoder = create_encoder(EncoderSpec("nano", 32, 8, drop_path_rate=0.5))
    blocks = encoder.blocks.train()
    x = torch.randn(6, 17, 32)
    _assert_same(blocks, lambda t: blocks_forward(blocks, t), blocks, x)


@pytest.mark.parametrize("kind", ["layer_scale", "qk_norm", "explicit_attention"])
def test_other_blocks_run_timms_own_forward(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "layer_scale":
        block = Block(32, 2, qkv_bias=True, init_values=0.1)
    elif kind == "qk_norm":
        block = Block(32, 2, qkv_bias=True, qk_norm=True)
    else:
        block = Block(32, 2, qkv_bias=True)
        set_fused_attention(block, False)
    assert isinstance(block.attn, Attention)
    assert not _plain_block(block)
    _assert_same(block, lambda t: block_forward(block, t), block, torch.randn(2, 9, 32))


def test_ssl_network_encode_equals_timm_features_with_and_without_grad() -> None:
    torch.manual_seed(0)
    network = SSLNetwork(create_encoder(EncoderSpec("nano", 32, 8)), ProjectionHead(32, 16, 24, 8))
    images = torch.randn(2, 3, 32, 32)
    _assert_same(network.backbone, network.encode, network.backbone.forward_features, images)
    with torch.no_grad():
        torch.testing.assert_close(network.encode(images), network.backbone.forward_features(images), **TOL)


def test_under_cpu_autocast_the_blocks_run_and_match_timm() -> None:
    torch.manual_seed(0)
    blocks = create_encoder(EncoderSpec("nano", 32, 8)).blocks
    x = torch.randn(2, 17, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = blocks_forward(blocks, x), blocks(x)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)  # bf16 rounding
