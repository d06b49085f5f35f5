"""bench_ssl_step's FLOP count: every matmul our SSL step runs is counted, in-place ones included.

FlopCounterMode has no formula for `addmm_` (our ViT blocks' residual projection) and counted 0 for it,
so the bench's ViT-Ti/8 step dropped from 267.5 to 221.0 GFLOP when the blocks started using it.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.bench_ssl_step import flop_formulas
from visionfm_core.models.encoders import EncoderSpec, create_encoder
from visionfm_core.ssl.head import ProjectionHead
from visionfm_core.ssl.network import SSLNetwork


def _flops(fn: object) -> int:
    counter = FlopCounterMode(display=False, custom_mapping=flop_formulas())
    with counter:
        fn()  # type: ignore[operator]
    return int(counter.get_total_flops())


def test_in_place_addmm_counts_as_its_matmul() -> None:
    a, b = torch.randn(5, 3), torch.randn(3, 7)
    expected = 2 * 5 * 3 * 7
    assert _flops(lambda: torch.addmm(torch.zeros(7), a, b)) == expected
    assert _flops(lambda: torch.zeros(5, 7).addmm_(a, b)) == expected


def test_our_encoder_counts_the_flops_of_timms_forward_and_backward() -> None:
    torch.manual_seed(0)
    network = SSLNetwork(create_encoder(EncoderSpec("nano", 32, 8)), ProjectionHead(32, 16, 24, 8))
    images = torch.randn(2, 3, 32, 32)

    def step(encode: object) -> None:
        encode(images).sum().backward()  # type: ignore[operator]

    ours = _flops(lambda: step(network.encode))
    timm = _flops(lambda: step(network.backbone.forward_features))
    assert ours == timm > 0
