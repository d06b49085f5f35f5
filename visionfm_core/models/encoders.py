"""ViT encoders by registered timm name; one encoder per modality, heads live elsewhere.

Every encoder is a timm `VisionTransformer` built with `num_classes=0` and `global_pool="token"`,
so its state dict uses timm's key names and `forward_features` returns all tokens for heads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import timm
import torch
from torch import nn

from visionfm_core.errors import ConfigError

# Short architecture names -> (timm model name, embed dim, depth, heads). "nano" and "micro" are tiny
# ViTs for tests and CPU demos; "mini" (twice micro's width and depth) is what segmentation trains
# from scratch on a CPU; the others are the standard ViT sizes VisionFM/RETFound use.
ARCHITECTURES: dict[str, tuple[str, int, int, int]] = {
    "nano": ("vit_tiny_patch16_224", 32, 2, 2),
    "micro": ("vit_tiny_patch16_224", 64, 2, 2),
    "mini": ("vit_tiny_patch16_224", 128, 4, 4),
    "tiny": ("vit_tiny_patch16_224", 192, 12, 3),
    "small": ("vit_small_patch16_224", 384, 12, 6),
    "base": ("vit_base_patch16_224", 768, 12, 12),
    "large": ("vit_large_patch16_224", 1024, 24, 16),
}


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to rebuild an encoder exactly (stored in checkpoint metadata)."""

    arch: str = "tiny"
    image_size: int = 224
    patch_size: int = 16
    drop_path_rate: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def timm_name(self) -> str:
        return ARCHITECTURES[self.arch][0]

    @property
    def embed_dim(self) -> int:
        return ARCHITECTURES[self.arch][1]

    @property
    def depth(self) -> int:
        return ARCHITECTURES[self.arch][2]

    @property
    def num_heads(self) -> int:
        return ARCHITECTURES[self.arch][3]

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `timm.create_model(self.timm_name, **kwargs)` that rebuild this encoder."""
        return {
            "pretrained": False,
            "num_classes": 0,
            "global_pool": "token",
            "img_size": self.image_size,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "drop_path_rate": self.drop_path_rate,
            # Different crop sizes (global 224, local 96) pass through one encoder.
            "dynamic_img_size": True,
        }


def validate_spec(spec: EncoderSpec) -> EncoderSpec:
    """Raise ConfigError naming the field when the spec cannot build a ViT."""
    if spec.arch not in ARCHITECTURES:
        raise ConfigError("arch", f"unknown architecture {spec.arch!r}; known: {', '.join(ARCHITECTURES)}")
    if spec.patch_size <= 0 or spec.image_size % spec.patch_size:
        raise ConfigError("image_size", f"{spec.image_size} is not a multiple of patch size {spec.patch_size}")
    if not 0.0 <= spec.drop_path_rate < 1.0:
        raise ConfigError("drop_path_rate", f"{spec.drop_path_rate} is not in [0, 1)")
    return spec


def encoder_kwargs(spec: EncoderSpec, input_shape: tuple[int, int] | None = None) -> dict[str, Any]:
    """timm's keyword arguments for `spec` (checked), built for a (height, width) `input_shape` when it
    is given and not the spec's square."""
    kwargs = validate_spec(spec).timm_kwargs()
    if input_shape is not None and tuple(input_shape) != (spec.image_size, spec.image_size):
        kwargs["img_size"] = list(input_shape)
    return kwargs


def create_encoder(spec: EncoderSpec, input_shape: tuple[int, int] | None = None) -> nn.Module:
    """Build a randomly initialised ViT encoder (timm, no classifier, no network access), for the
    spec's square input or a (height, width) `input_shape`."""
    model: nn.Module = timm.create_model(spec.timm_name, **encoder_kwargs(spec, input_shape))
    return model


def encoder_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's weights as detached CPU tensors with timm key names."""
    return {k: v.detach().to("cpu") for k, v in encoder.state_dict().items()}
