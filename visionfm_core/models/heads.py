"""Task heads on a timm ViT encoder's intermediate blocks, and the encoder+head model they form.

One encoder pass (`encode`) yields the [CLS] token and the patch-token map of every block a head asks
for; heads never touch the encoder themselves, so the same encoder weights serve every task and the
federation can average the encoder alone. Every head is rebuilt from ``head.config`` (plain JSON) by
:func:`build_head`, which is how task checkpoints store them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionfm_core.errors import ConfigError

HeadOutput = Tensor | dict[str, Tensor]


@dataclass
class EncoderFeatures:
    """What heads see: per block index, the [CLS] token (B, D) and the patch map (B, D, h, w)."""

    cls: dict[int, Tensor]
    maps: dict[int, Tensor]
    image: Tensor


def encode(encoder: nn.Module, images: Tensor, blocks: Sequence[int], norm: bool = True) -> EncoderFeatures:
    """Run ``encoder`` once and keep the requested blocks (timm ``forward_intermediates``).

    ``norm=True`` applies the encoder's final LayerNorm to every kept block, as DINO's and VisionFM's
    linear evaluation do; it puts early and late blocks on one scale for the heads.
    """
    wanted = sorted(set(blocks))
    outputs = encoder.forward_intermediates(  # type: ignore[operator]
        images,
        indices=wanted,
        return_prefix_tokens=True,
        norm=norm,
        output_fmt="NCHW",
        intermediates_only=True,
    )
    cls = {block: prefix[:, 0] for block, (_, prefix) in zip(wanted, outputs, strict=True)}
    maps = {block: spatial for block, (spatial, _) in zip(wanted, outputs, strict=True)}
    return EncoderFeatures(cls=cls, maps=maps, image=images)


def last_blocks(depth: int, count: int) -> tuple[int, ...]:
    """Indices of the last ``count`` blocks (fewer when the encoder is shallower)."""
    return tuple(range(max(0, depth - count), depth))


def spread_blocks(depth: int, count: int = 4) -> tuple[int, ...]:
    """``count`` block indices spread evenly up to the last (UNETR's 3, 6, 9, 12 for a depth-12 ViT)."""
    return tuple(max(0, round(depth * (k + 1) / count) - 1) for k in range(count))


class TaskHead(nn.Module):
    """Base of every head: ``blocks`` says which encoder blocks it reads, ``config`` rebuilds it."""

    kind: ClassVar[str] = ""
    blocks: tuple[int, ...]
    config: dict[str, Any]

    def forward(self, features: EncoderFeatures) -> HeadOutput:
        raise NotImplementedError


class ProbeHead(TaskHead):
    """VisionFM's frozen-encoder probe: concatenated [CLS] of the last blocks, BatchNorm, 3-layer MLP.

    With a ViT-B (768-d, 4 blocks) this is VisionFM's 3072-1536-768-C classifier.
    """

    kind = "probe"

    def __init__(self, embed_dim: int, depth: int, num_outputs: int, num_last_blocks: int = 4) -> None:
        super().__init__()
        self.config = {
            "embed_dim": embed_dim,
            "depth": depth,
            "num_outputs": num_outputs,
            "num_last_blocks": num_last_blocks,
        }
        self.blocks = last_blocks(depth, num_last_blocks)
        width = embed_dim * len(self.blocks)
        self.mlp = nn.Sequential(
            nn.BatchNorm1d(width),
            nn.Linear(width, width // 2),
            nn.GELU(),
            nn.Linear(width // 2, width // 4),
            nn.GELU(),
            nn.Linear(width // 4, num_outputs),
        )

    def forward(self, features: EncoderFeatures) -> Tensor:
        pooled = torch.cat([features.cls[b] for b in self.blocks], dim=1)
        out: Tensor = self.mlp(pooled.float())
        return out


POOLS = ("token", "avg", "token+avg")


class LinearHead(TaskHead):
    """The last block's features, dropout, one linear layer: the usual full fine-tuning classifier.

    ``pool``: "token" ([CLS], DINO/VisionFM's linear head), "avg" (the mean patch token, RETFound's
    and MAE's fine-tuning choice) or "token+avg" (both, concatenated): the mean patch token hands the
    classifier the image's global statistics directly, which a ViT trained on a small set from scratch
    otherwise learns late or not at all."""

    kind = "linear"

    def __init__(self, embed_dim: int, depth: int, num_outputs: int, dropout: float = 0.0,
                 pool: str = "token") -> None:
        super().__init__()
        if pool not in POOLS:
            raise ConfigError("pool", f"unknown pooling {pool!r}; use {', '.join(POOLS)}")
        self.config = {"embed_dim": embed_dim, "depth": depth, "num_outputs": num_outputs, "dropout": dropout}
        if pool != "token":  # older checkpoints have no "pool": [CLS]
            self.config["pool"] = pool
        self.pool = pool
        self.blocks = (depth - 1,)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(embed_dim * (2 if pool == "token+avg" else 1), num_outputs)
        nn.init.trunc_normal_(self.fc.weight, std=2e-5)  # small init so the pretrained features lead at first
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: EncoderFeatures) -> Tensor:
        block = self.blocks[0]
        parts = []
        if self.pool != "avg":
            parts.append(features.cls[block])
        if self.pool != "token":
            parts.append(features.maps[block].mean(dim=(2, 3)))
        out: Tensor = self.fc(self.dropout(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]))
        return out


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class _MaxPool2x2Indexed(torch.autograd.Function):
    """2x2 max pooling whose indices come from the channels-last kernel and whose gradient is
    scattered back by ``max_unpool2d``: the same values and gradients (ties go to the first pixel in
    row-major order, as ``max_pool2d``'s), at about 0.4x the CPU time of the NCHW kernel."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        pooled, indices = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 2, return_indices=True)
        ctx.save_for_backward(indices.contiguous())
        ctx.size = tuple(x.shape[-2:])
        return pooled.contiguous()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (indices,) = ctx.saved_tensors
        return F.max_unpool2d(grad.contiguous(), indices, (2, 2), output_size=ctx.size)


class MaxPool2x2(nn.Module):
    """``nn.MaxPool2d(2)`` (floor: an odd last row or column is dropped), computed faster on the CPU:
    PyTorch's NCHW max pooling took 4.6 ms of a 1 thread decoder step on a 2x32x112x112 map, against
    0.6 ms for the maximum of its four 2x2 phases (inference) or 2.4 ms forward and backward with
    channels-last indices (training). No parameters: checkpoints are unchanged."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            out: Tensor = _MaxPool2x2Indexed.apply(x)
            return out
        x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]
        return torch.maximum(
            torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2]), torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2])
        )


def conv_norm_gelu(in_channels: int, out_channels: int) -> list[nn.Module]:
    """One 3x3 convolution with GroupNorm (works at batch size 1, unlike BatchNorm) and GELU, as a list
    of layers to splice into a Sequential (so its state-dict keys stay flat indices)."""
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(_groups(out_channels), out_channels), nn.GELU()]


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions with GroupNorm and GELU (`conv_norm_gelu` twice)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(*conv_norm_gelu(in_channels, out_channels), *conv_norm_gelu(out_channels, out_channels))


class UpBlock(nn.Sequential):
    """Double the resolution (transposed convolution) then refine."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2), ConvBlock(out_channels, out_channels)
        )


def _project(in_channels: int, out_channels: int, doublings: int) -> nn.Module:
    """UNETR's skip path: a block's patch map brought up ``doublings`` times to its decoder stage."""
    layers: list[nn.Module] = [ConvBlock(in_channels, out_channels)] if doublings == 0 else []
    channels = in_channels
    for _ in range(doublings):
        layers.append(UpBlock(channels, out_channels))
        channels = out_channels
    return nn.Sequential(*layers)


def _token_projection(in_channels: int, out_channels: int) -> nn.Sequential:
    """The encoder blocks' patch maps, concatenated, projected to the decoder's context width (1x1)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.GroupNorm(_groups(out_channels), out_channels),
        nn.GELU(),
    )


class UNETRHead(TaskHead):
    """UNETR-style decoder: the last block's patch map is doubled stage by stage back to the input
    size; at each of the first stages an earlier block's map, brought up to the same size, is fused
    in (coarse to fine), and a full-resolution skip from the image itself is fused last (thin
    structures such as vessels).

    The number of stages is log2 of the patch size (4 for patch 16, as in UNETR); a patch size that
    is not a power of two is reconciled by interpolation before the image skip, so any patch size
    and any input size (a multiple of the patch) works. Output: logits (B, C, H, W).
    """

    kind = "unetr"

    def __init__(self, embed_dim: int, depth: int, num_classes: int, features: int = 16, patch_size: int = 16) -> None:
        super().__init__()
        self.config = {
            "embed_dim": embed_dim,
            "depth": depth,
            "num_classes": num_classes,
            "features": features,
            "patch_size": patch_size,
        }
        self.blocks = spread_blocks(depth, 4)
        stages = max(1, round(math.log2(patch_size)))
        widths = [features * 2 ** (stages - s) for s in range(1, stages + 1)]  # 8f, 4f, 2f, f for patch 16
        skips = min(3, stages)  # earlier blocks feed the first stages, deepest first
        self.ups = nn.ModuleList()
        self.skips = nn.ModuleList()
        self.fuses = nn.ModuleList()
        channels = embed_dim
        for stage, width in enumerate(widths, start=1):
            self.ups.append(UpBlock(channels, width))
            if stage <= skips:
                self.skips.append(_project(embed_dim, width, stage))
                self.fuses.append(ConvBlock(width * 2, width))
            channels = width
        self.image_skip = ConvBlock(3, features)
        self.fuse_full = ConvBlock(channels + features, features)
        self.classifier = nn.Conv2d(features, num_classes, 1)

    def forward(self, features: EncoderFeatures) -> Tensor:
        maps = [features.maps[b].float() for b in self.blocks]
        x = maps[-1]
        for stage, up in enumerate(self.ups):
            x = up(x)
            if stage < len(self.skips):
                skip = self.skips[stage](maps[-2 - stage])
                x = self.fuses[stage](torch.cat([x, skip], 1))
        image = features.image.float()
        if x.shape[-2:] != image.shape[-2:]:
            x = F.interpolate(x, size=image.shape[-2:], mode="bilinear", align_corners=False)
        x = self.fuse_full(torch.cat([x, self.image_skip(image)], 1))
        out: Tensor = self.classifier(x)
        return out


class LightUNETRHead(TaskHead):
    """A UNETR-style decoder sized for CPUs: a small convolutional stem on the image at full, half
    and quarter resolution (where the thin structures are), and the patch maps of several encoder
    depths, concatenated, projected and brought up to the quarter-resolution stage (the context).
    Decoding climbs back with bilinear upsampling, fusing each stem level; the full-resolution path
    keeps one-pixel vessels. About a quarter of :class:`UNETRHead`'s arithmetic at equal input.
    Output: logits (B, C, H, W) for any input size.
    """

    kind = "unetr-light"

    def __init__(self, embed_dim: int, depth: int, num_classes: int, features: int = 8) -> None:
        super().__init__()
        self.config = {"embed_dim": embed_dim, "depth": depth, "num_classes": num_classes, "features": features}
        self.blocks = tuple(sorted(set(spread_blocks(depth, 4))))
        f = features
        self.stem1 = ConvBlock(3, f)
        self.stem2 = nn.Sequential(MaxPool2x2(), ConvBlock(f, 2 * f))
        self.stem4 = nn.Sequential(MaxPool2x2(), ConvBlock(2 * f, 4 * f))
        self.tokens = _token_projection(embed_dim * len(self.blocks), 4 * f)
        self.fuse4 = ConvBlock(8 * f, 4 * f)
        self.fuse2 = ConvBlock(6 * f, 2 * f)
        self.fuse1 = ConvBlock(3 * f, f)
        self.classifier = nn.Conv2d(f, num_classes, 1)

    def forward(self, features: EncoderFeatures) -> Tensor:
        image = features.image.float()
        full = self.stem1(image)
        half = self.stem2(full)
        quarter = self.stem4(half)
        context = self.tokens(torch.cat([features.maps[b].float() for b in self.blocks], 1))
        x = F.interpolate(context, size=quarter.shape[-2:], mode="bilinear", align_corners=False)
        x = self.fuse4(torch.cat([x, quarter], 1))
        x = F.interpolate(x, size=half.shape[-2:], mode="bilinear", align_corners=False)
        x = self.fuse2(torch.cat([x, half], 1))
        x = F.interpolate(x, size=full.shape[-2:], mode="bilinear", align_corners=False)
        x = self.fuse1(torch.cat([x, full], 1))
        out: Tensor = self.classifier(x)
        return out


FOLD = 2  # FoldedUNETRHead: pixels per side folded into one half-resolution position
FUSES = ("conv", "reduce", "lean")


def _fuse_block(in_channels: int, out_channels: int, fuse: str) -> nn.Module:
    """The folded decoder's half-resolution fusion. ``conv``: a :class:`ConvBlock` on the concatenated
    input. ``reduce``: a 1x1 convolution first projects the input to ``out_channels``, then a
    :class:`ConvBlock` (a low-rank factorisation of the first 3x3: for 76 channels in and 32 out, 0.53x
    its arithmetic). ``lean``: that projection, then a single 3x3 convolution with GroupNorm and GELU."""
    if fuse == "conv":
        return ConvBlock(in_channels, out_channels)
    project = nn.Conv2d(in_channels, out_channels, 1, bias=False)  # linear: the 3x3 after it normalises
    if fuse == "reduce":
        return nn.Sequential(project, ConvBlock(out_channels, out_channels))
    return nn.Sequential(project, *conv_norm_gelu(out_channels, out_channels))


class FoldedUNETRHead(TaskHead):
    """:class:`LightUNETRHead`'s design with the full resolution folded into channels: every 2x2
    block of pixels becomes one half-resolution position with 12 input channels (pixel unshuffle),
    all decoding runs at half and quarter resolution, and the last 1x1 convolution predicts the four
    sub-pixels' logits, unfolded back to full resolution (pixel shuffle). No pixel is lost, so
    one-pixel vessels stay, but no convolution runs at full resolution, where a CPU spends most of a
    narrow decoder's time (few channels, many pixels), and the convolutions that remain are wider,
    which a CPU runs faster per operation: ``features`` channels at half resolution (32 = 8 per
    full-resolution pixel, as many values as the light decoder's 8 there, with 4x the weights),
    ``context`` at quarter resolution, and the folded image itself fused again before the classifier.
    Output: logits (B, C, H, W) for any input size (an odd side is padded by one pixel, then cropped).
    """

    kind = "unetr-folded"

    def __init__(self, embed_dim: int, depth: int, num_classes: int, features: int = 32,
                 context: int | None = None, fuse: str = "conv") -> None:
        super().__init__()
        context = context if context is not None else features
        if fuse not in FUSES:
            raise ConfigError("head", f"unknown fuse {fuse!r} for a folded decoder; known: {', '.join(FUSES)}")
        self.config = {
            "embed_dim": embed_dim,
            "depth": depth,
            "num_classes": num_classes,
            "features": features,
            "context": context,
        }
        if fuse != "conv":  # absent means "conv", so checkpoints from before the key load unchanged
            self.config["fuse"] = fuse
        self.blocks = tuple(sorted(set(spread_blocks(depth, 4))))
        folded = 3 * FOLD * FOLD
        self.stem2 = ConvBlock(folded, features)
        self.stem4 = nn.Sequential(MaxPool2x2(), ConvBlock(features, context))
        self.tokens = _token_projection(embed_dim * len(self.blocks), context)
        self.fuse4 = ConvBlock(2 * context, context)
        self.fuse2 = _fuse_block(context + features + folded, features, fuse)
        self.classifier = nn.Conv2d(features, num_classes * FOLD * FOLD, 1)

    def forward(self, features: EncoderFeatures) -> Tensor:
        image = features.image.float()
        height, width = image.shape[-2:]
        pad_h, pad_w = height % FOLD, width % FOLD
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), mode="replicate")
        folded = F.pixel_unshuffle(image, FOLD)
        half = self.stem2(folded)
        quarter = self.stem4(half)
        x = self.tokens(torch.cat([features.maps[b].float() for b in self.blocks], 1))
        x = F.interpolate(x, size=quarter.shape[-2:], mode="bilinear", align_corners=False)
        x = self.fuse4(torch.cat([x, quarter], 1))
        x = F.interpolate(x, size=half.shape[-2:], mode="bilinear", align_corners=False)
        x = self.fuse2(torch.cat([x, half, folded], 1))
        out: Tensor = F.pixel_shuffle(self.classifier(x), FOLD)[..., :height, :width]
        return out


class _TokenDecoder(nn.Module):
    """The last block's map plus a middle block's, fused and doubled ``doublings`` times."""

    def __init__(self, embed_dim: int, channels: int, doublings: int) -> None:
        super().__init__()
        self.fuse = ConvBlock(embed_dim * 2, channels)
        self.ups = nn.Sequential(*[UpBlock(channels, channels) for _ in range(doublings)])

    def forward(self, middle: Tensor, last: Tensor) -> Tensor:
        out: Tensor = self.ups(self.fuse(torch.cat([middle.float(), last.float()], 1)))
        return out


class HeatmapHead(TaskHead):
    """K landmark heatmaps (logits) at 1/4 of the patch size's stride (stride 4 for patch 16).

    The landmark adapter turns them into coordinates with a spatial soft-argmax, so training can
    supervise both the heatmap and the coordinate.
    """

    kind = "heatmap"

    def __init__(self, embed_dim: int, depth: int, num_points: int, channels: int = 32) -> None:
        super().__init__()
        self.config = {"embed_dim": embed_dim, "depth": depth, "num_points": num_points, "channels": channels}
        self.blocks = (max(0, depth // 2 - 1), depth - 1)
        self.decoder = _TokenDecoder(embed_dim, channels, doublings=2)
        self.out = nn.Conv2d(channels, num_points, 1)

    def forward(self, features: EncoderFeatures) -> Tensor:
        out: Tensor = self.out(self.decoder(features.maps[self.blocks[0]], features.maps[self.blocks[1]]))
        return out


class CenterNetHead(TaskHead):
    """A light anchor-free box head (CenterNet-style) at half the patch stride.

    Outputs ``heatmap`` (B, C, h, w) centre logits per class, ``size`` (B, 2, h, w) log width and
    height in stride units, and ``offset`` (B, 2, h, w) sub-cell centre offsets in [0, 1].
    """

    kind = "center"

    def __init__(self, embed_dim: int, depth: int, num_classes: int, channels: int = 32) -> None:
        super().__init__()
        self.config = {
            "embed_dim": embed_dim,
            "depth": depth,
            "num_classes": num_classes,
            "channels": channels,
        }
        self.blocks = (max(0, depth // 2 - 1), depth - 1)
        self.decoder = _TokenDecoder(embed_dim, channels, doublings=1)
        self.heatmap = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.size = nn.Conv2d(channels, 2, 3, padding=1)
        self.offset = nn.Conv2d(channels, 2, 3, padding=1)
        nn.init.constant_(self.heatmap.bias, -2.19)  # type: ignore[arg-type]  # prior 0.1 objectness: the focal loss starts stable

    def forward(self, features: EncoderFeatures) -> dict[str, Tensor]:
        x = self.decoder(features.maps[self.blocks[0]], features.maps[self.blocks[1]])
        return {"heatmap": self.heatmap(x), "size": self.size(x), "offset": torch.sigmoid(self.offset(x))}


HEADS: dict[str, type[TaskHead]] = {
    h.kind: h for h in (
        ProbeHead, LinearHead, UNETRHead, LightUNETRHead, FoldedUNETRHead, HeatmapHead, CenterNetHead
    )
}


def build_head(kind: str, config: dict[str, Any]) -> TaskHead:
    """Rebuild a head from its ``kind`` and ``config`` (as stored in a task checkpoint)."""
    if kind not in HEADS:
        raise ConfigError("head", f"unknown head {kind!r}; known: {', '.join(HEADS)}")
    try:
        return HEADS[kind](**config)
    except TypeError as exc:
        raise ConfigError("head", f"config does not fit a {kind!r} head: {exc}") from exc


class TaskModel(nn.Module):
    """An encoder and a head. With ``freeze_encoder`` the encoder runs without gradients in eval
    mode (no dropout or drop-path), as VisionFM's frozen-encoder evaluation does."""

    def __init__(self, encoder: nn.Module, head: TaskHead, freeze_encoder: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.freeze_encoder = freeze_encoder
        self.encoder.requires_grad_(not freeze_encoder)

    def train(self, mode: bool = True) -> TaskModel:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def forward(self, images: Tensor) -> HeadOutput:
        if self.freeze_encoder:
            with torch.no_grad():
                features = encode(self.encoder, images, self.head.blocks)
        else:
            features = encode(self.encoder, images, self.head.blocks)
        return self.head(features)


def encoder_dims(encoder: nn.Module) -> tuple[int, int, int]:
    """(embed_dim, depth, patch_size) of a timm ViT encoder."""
    patch: Any = getattr(encoder.patch_embed, "patch_size", 16)
    patch_size = int(patch[0] if isinstance(patch, tuple | list) else patch)
    embed_dim: Any = encoder.embed_dim
    blocks: Any = encoder.blocks
    return int(embed_dim), len(blocks), patch_size
