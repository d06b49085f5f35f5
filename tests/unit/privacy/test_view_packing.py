"""Packing all views of an image into one block-diagonal sequence gives the per-resolution encodings
and their gradients, and is skipped where it would change the maths (drop path)."""

from __future__ import annotations

import torch
from torch import Tensor

from client.privacy.view_packing import can_pack, encode_views
from visionfm_core.modalities import get_modality
from visionfm_core.models.encoders import EncoderSpec
from visionfm_core.ssl.config import SSLConfig
from visionfm_core.ssl.network import SSLNetwork
from visionfm_core.ssl.trainer import SSLTrainer

CFG = SSLConfig(out_dim=48, head_hidden_dim=32, head_bottleneck_dim=16, local_crops=2, local_crop_size=16, amp=False)


def student(drop_path_rate: float = 0.0) -> SSLNetwork:
    torch.manual_seed(0)
    spec = EncoderSpec("nano", image_size=32, patch_size=8, drop_path_rate=drop_path_rate)
    network = SSLTrainer(spec, get_modality("fundus"), CFG, total_steps=10).student
    network.train()
    return network


def groups() -> list[tuple[Tensor, Tensor | None]]:
    generator = torch.Generator().manual_seed(1)
    masks = torch.rand(2, 4, 4, generator=generator) < 0.4
    return [
        (torch.randn(2, 3, 32, 32, generator=generator), masks),
        (torch.randn(2, 3, 16, 16, generator=generator), None),
        (torch.randn(1, 3, 24, 24, generator=generator), None),
    ]


def test_packed_views_give_each_resolutions_tokens_and_gradients() -> None:
    network = student()
    assert can_pack(network)
    views = groups()
    packed = encode_views(network, views)
    separate = [network.encode(images, masks) for images, masks in views]
    assert [t.shape for t in packed] == [t.shape for t in separate] == [(2, 17, 32), (2, 5, 32), (1, 10, 32)]
    for a, b in zip(packed, separate, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Views must not see each other: changing the local views leaves the global tokens as they were.
    changed = [views[0], (views[1][0] + 1.0, None), views[2]]
    torch.testing.assert_close(encode_views(network, changed)[0], packed[0], rtol=1e-5, atol=1e-5)

    weights = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i)) for i, t in enumerate(packed)]
    assert network.mask_token is not None
    params = [*network.backbone.parameters(), network.mask_token]
    packed_grads = torch.autograd.grad(sum((t * w).sum() for t, w in zip(packed, weights, strict=True)), params)
    separate_grads = torch.autograd.grad(sum((t * w).sum() for t, w in zip(separate, weights, strict=True)), params)
    for a, b in zip(packed_grads, separate_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_drop_path_keeps_one_pass_per_resolution() -> None:
    network = student(drop_path_rate=0.2)
    assert not can_pack(network)
    views = groups()
    with torch.random.fork_rng():
        torch.manual_seed(3)
        fallback = encode_views(network, views)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        separate = [network.encode(images, masks) for images, masks in views]
    for a, b in zip(fallback, separate, strict=True):
        assert torch.equal(a, b)
    network.eval()  # drop path is off outside training: packing is exact again
    assert can_pack(network)
