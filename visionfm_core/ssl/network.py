"""A timm ViT backbone plus projection head, with iBOT's learnable mask token for the student.

The backbone stays an unmodified timm `VisionTransformer`, so its state dict loads into
`create_encoder(spec)` with strict=True; the mask token is a separate parameter of this wrapper
(`mask_token`), never a `backbone.*` key. Encoding runs timm's own submodules and weights in timm's
order (patch embedding, iBOT mask substitution, position embedding, blocks, norm); the patch embedding
is computed as one matmul, the blocks with fewer passes over memory (`ssl/blocks.py`), and the residual
stream may be kept in bf16 (see `embed_patches`, `SSLNetwork.token_dtype`): timm's results, faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visionfm_core.errors import ConfigError
from visionfm_core.ssl.blocks import blocks_forward
from visionfm_core.ssl.head import ProjectionHead


class SSLNetwork(nn.Module):
    """Backbone + head. `mask_token` exists only for an iBOT student."""

    def __init__(self, backbone: nn.Module, head: ProjectionHead, with_mask_token: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.mask_token: nn.Parameter | None = None
        # Under autocast, carry the residual stream in this dtype (bf16) instead of fp32, as Megatron does
        # by default: saves the fp32<->bf16 casts around every LayerNorm (~14% of a CPU step).
        self.token_dtype: torch.dtype | None = None
        if with_mask_token:
            embed_dim = int(getattr(backbone, "embed_dim"))  # noqa: B009 - timm attribute, typed as Any
            self.mask_token = nn.Parameter(torch.zeros(embed_dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    @property
    def patch_size(self) -> int:
        return int(self.backbone.patch_embed.patch_size[0])  # type: ignore[union-attr,index]

    def encode(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """All output tokens [B, 1 + N, D] ([CLS] first). `masks` [B, h, w] replaces those patches'
        embeddings with the mask token before position embeddings are added (iBOT)."""
        x = self.embed(images, masks)
        if self.token_dtype is not None and torch.is_autocast_enabled(x.device.type):
            x = x.to(self.token_dtype)
        x = blocks_forward(self.backbone.blocks, x)  # type: ignore[arg-type]  # timm's blocks (ssl/blocks.py)
        return self.backbone.norm(x)  # type: ignore[operator, no-any-return]

    def embed(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """The tokens that enter the first block: patch embedding, iBOT mask substitution, position
        embedding, patch dropout and pre-norm, in timm's order."""
        backbone = self.backbone
        x = embed_patches(backbone, images)
        if masks is not None and self.mask_token is not None:
            where = masks.unsqueeze(-1) if x.ndim == 4 else masks.flatten(1).unsqueeze(-1)
            x = torch.where(where, self.mask_token.to(x.dtype), x)
        x = backbone._pos_embed(x)  # type: ignore[operator]
        x = backbone.patch_drop(x)  # type: ignore[operator]
        return backbone.norm_pre(x)  # type: ignore[operator, no-any-return]

    def backbone_and_head_parameters(self) -> list[nn.Parameter]:
        """The parameters a teacher mirrors (everything but the mask token), in a fixed order."""
        return [*self.backbone.parameters(), *self.head.parameters()]


def set_fused_attention(module: nn.Module, enabled: bool) -> int:
    """Switch every timm attention layer under `module` between the fused SDPA kernel and explicit
    attention (same maths, no weights touched). Returns how many layers were switched."""
    switched = 0
    for layer in module.modules():
        if hasattr(layer, "fused_attn"):
            layer.fused_attn = enabled  # type: ignore[assignment]
            switched += 1
    return switched


def embed_patches(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """timm's patch embedding, [B, h, w, D] (dynamic size) or [B, N, D], from timm's own weights.

    A non-overlapping conv (kernel = stride = patch) is the same maths as cutting the image into
    patches and applying one matmul, and under bf16 on a CPU the matmul runs about 3x faster than
    oneDNN's strided convolution (forward + backward, ViT-S/16 at 224 px). Other embeddings run as is.
    """
    embed = backbone.patch_embed
    proj = getattr(embed, "proj", None)
    patch = tuple(getattr(embed, "patch_size", ()))
    nhwc = str(getattr(getattr(embed, "output_fmt", None), "value", "")) == "NHWC"
    flatten = bool(getattr(embed, "flatten", False))
    plain = (
        isinstance(proj, nn.Conv2d) and len(patch) == 2 and tuple(proj.kernel_size) == patch
        and tuple(proj.stride) == patch and proj.padding == (0, 0) and proj.groups == 1
        and not getattr(embed, "dynamic_img_pad", False) and (nhwc or flatten)
    )
    if not plain:
        return embed(images)  # type: ignore[operator, no-any-return]
    assert isinstance(proj, nn.Conv2d)
    batch, channels, height, width = images.shape
    ph, pw = patch
    if height % ph or width % pw:
        raise ConfigError("crop_size", f"a {height}x{width} px view is not a multiple of the patch size {ph}")
    rows, cols = height // ph, width // pw
    patches = images.reshape(batch, channels, rows, ph, cols, pw).permute(0, 2, 4, 1, 3, 5)
    x = F.linear(patches.reshape(batch, rows, cols, channels * ph * pw),
                 proj.weight.reshape(proj.out_channels, -1), proj.bias)
    return embed.norm(x.flatten(1, 2) if flatten else x)  # type: ignore[operator, arg-type, no-any-return]
