"""All the views of one image through the student's transformer blocks in one pass.

DP-SGD computes each image's gradient on its own (`dp_step`, vmap over images). With one encoder
call per crop resolution, every weight of every block gets one per-image gradient per call, and
these [images, *weight] tensors are then added: memory traffic that made the private iBOT step
2.2x the non-private one (ViT-Tiny, 96 px, 2 global + 2 local crops). Here the token sequences of
all views are concatenated into one sequence and attention is restricted to each view's own tokens
(a block-diagonal mask), which is the same computation: LayerNorm, MLP and the projections act on
each token alone and attention is the only place tokens meet. Each weight then gets one per-image
gradient.

Only for timm `Block`s without an active drop path: drop path drops a residual branch per sequence,
so packing would drop it for all views of an image at once instead of per view. Otherwise (or for
any other block type) the views are encoded one resolution at a time, as `SSLNetwork.encode` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from visionfm_core.ssl.network import SSLNetwork

ViewGroup = tuple[Tensor, Tensor | None]  # (views [V, 3, H, W], iBOT masks [V, h, w] or None)


def can_pack(student: SSLNetwork) -> bool:
    """Whether `encode_views` may pack views: plain timm blocks, no drop path in effect."""
    blocks = getattr(student.backbone, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0 or student.token_dtype is not None:
        return False
    for block in blocks:
        if type(block) is not Block:
            return False
        for drop in (block.drop_path1, block.drop_path2):
            if block.training and float(getattr(drop, "drop_prob", 0.0)) > 0.0:
                return False
    return True


def encode_views(student: SSLNetwork, groups: Sequence[ViewGroup]) -> list[Tensor]:
    """Output tokens [V, 1 + N, D] of each group of views of one image, as `student.encode` gives them."""
    if len(groups) == 1 or not can_pack(student):
        return [student.encode(views, masks) for views, masks in groups]
    backbone = student.backbone
    embedded = [student.embed(views, masks) for views, masks in groups]  # each [V, T, D]
    lengths = [int(x.shape[1]) for x in embedded for _ in range(int(x.shape[0]))]
    sequence = torch.cat([x.reshape(1, -1, x.shape[-1]) for x in embedded], dim=1)
    # True where a token may attend: within its own view only.
    allowed = torch.block_diag(*[torch.ones(n, n, dtype=torch.bool, device=sequence.device) for n in lengths])
    for block in backbone.blocks:  # type: ignore[union-attr]
        sequence = block(sequence, attn_mask=allowed)
    sequence = backbone.norm(sequence)  # type: ignore[operator]
    out: list[Tensor] = []
    start = 0
    for x in embedded:
        count = int(x.shape[0]) * int(x.shape[1])
        out.append(sequence[0, start : start + count].reshape(x.shape))
        start += count
    return out


