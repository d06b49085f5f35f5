"""Import released encoder weights (VisionFM, RETFound MAE, RETFound DINOv2, plain timm) into our encoders.

Nothing is downloaded: users bring the files. Torch checkpoints are pickles; they are opened with
``weights_only=True`` and an allow-list of the plain-data classes those files contain
(``argparse.Namespace`` for the saved arguments, NumPy scalars and dtypes). A file that needs
anything else is refused with the names it asks for; only someone who trusts where the file came
from should then re-run with ``trust=True`` (a full unpickle can run arbitrary code).

Key mapping (the released checkpoints' layouts; tests/unit/models/test_importers.py builds each):
- VisionFM pretraining: ``teacher`` with ``backbone.``/``module.`` prefixes; ``head.*`` and
  ``masked_embed`` dropped.
- RETFound MAE: ``model``; decoder, ``mask_token`` and any classifier dropped.
- RETFound DINOv2: ``teacher`` with ``backbone.``; ``mlp.w12``/``mlp.w3`` -> ``mlp.fc1``/``mlp.fc2``;
  FSDP block chunks (``blocks.<chunk>.<i>``) flattened; DINO/iBOT heads and ``mask_token`` dropped.
The architecture is read from the tensor shapes; the position embedding is resampled when another
input size is asked for.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from visionfm_core.errors import CheckpointError, ConfigError
from visionfm_core.modalities import get_modality
from visionfm_core.models.checkpoint import FORMAT_VERSION
from visionfm_core.models.encoders import ARCHITECTURES

SourceFormat = Literal["visionfm", "retfound_mae", "retfound_dinov2", "timm"]
SOURCE_FORMATS: tuple[str, ...] = ("visionfm", "retfound_mae", "retfound_dinov2", "timm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TRUST_HINT = (
    "only if you trust where this file came from, import it with trust=True "
    "(CLI: --trust), which runs a full unpickle that can execute code from the file"
)


def _allowed_globals() -> list[Any]:
    """Plain-data classes that the released checkpoints pickle besides tensors."""
    allowed: list[Any] = [argparse.Namespace, np.dtype, np.ndarray]
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    scalar = getattr(np, "_core", np).multiarray.scalar  # numpy 2 moved numpy.core to numpy._core
    reconstruct = getattr(np, "_core", np).multiarray._reconstruct
    # Files written with NumPy 1 refer to these by their old module path.
    allowed += [
        scalar,
        (scalar, "numpy.core.multiarray.scalar"),
        reconstruct,
        (reconstruct, "numpy.core.multiarray._reconstruct"),
    ]
    return allowed


def unsafe_globals(path: str | Path) -> list[str]:
    """Classes/functions a torch pickle would import, outside torch's and our allow-list (no unpickling)."""
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        return []
    allowed = {
        "argparse.Namespace",
        "numpy.dtype",
        "numpy.ndarray",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
    }
    return [name for name in needed if name not in allowed and not name.startswith("numpy.dtypes.")]


def load_checkpoint(path: str | Path, trust: bool = False) -> dict[str, Any]:
    """A torch checkpoint as a dict, unpickled with the allow-list unless ``trust`` is set."""
    name = str(path)
    if not Path(path).is_file():
        raise CheckpointError(name, "file not found")
    try:
        if trust:
            loaded = torch.load(name, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(_allowed_globals()):
                loaded = torch.load(name, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        needed = unsafe_globals(path)
        detail = f"it needs {', '.join(needed)}" if needed else f"({str(exc).splitlines()[0]})"
        raise CheckpointError(
            name, f"refused to unpickle: {detail}, beyond the plain data allowed; {TRUST_HINT}"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(name, f"not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(loaded, dict):
        raise CheckpointError(name, f"expected a dict of weights, found {type(loaded).__name__}")
    return loaded


def _tensors(mapping: Any) -> dict[str, Tensor]:
    return {k: v for k, v in mapping.items() if isinstance(v, Tensor)} if isinstance(mapping, dict) else {}


def detect_format(checkpoint: dict[str, Any]) -> SourceFormat:
    """Which upstream layout a loaded checkpoint has."""
    teacher = _tensors(checkpoint.get("teacher"))
    if teacher:
        dinov2_marks = (
            ".ls1.",
            "mlp.w12",
            "dino_head.",
            "ibot_head.",
            "backbone.mask_token",
            "register_tokens",
        )
        return "retfound_dinov2" if any(m in k for k in teacher for m in dinov2_marks) else "visionfm"
    model = _tensors(checkpoint.get("model"))
    if model:
        return "retfound_mae" if _is_retfound(checkpoint, model) else "timm"
    if _tensors(checkpoint.get("visionfm_state_dict")) or _tensors(checkpoint.get("state_dict")):
        return "timm"
    if _tensors(checkpoint):
        return "timm"
    raise CheckpointError("<checkpoint>", f"no weights found; top-level keys: {sorted(checkpoint)[:12]}")


# RETFound's released encoders: ViT-Large/16 at 224 px (1024-d, 24 blocks, 14x14 patches + [CLS]).
_RETFOUND_SHAPES = {
    "cls_token": (1, 1, 1024),
    "pos_embed": (1, 197, 1024),
    "patch_embed.proj.weight": (1024, 3, 16, 16),
    "blocks.23.mlp.fc1.weight": (4096, 1024),
}
# What MAE's training script (which RETFound uses) stores in its `args` besides the weights.
_MAE_ARGS = ("mask_ratio", "norm_pix_loss", "blr", "accum_iter")


def _is_retfound(checkpoint: dict[str, Any], model: dict[str, Tensor]) -> bool:
    """RETFound (MAE code) stores {"model": ..., "args": Namespace, "epoch", ...}. With the MAE
    decoder keys it is certainly MAE; without them (an encoder-only or fine-tuned release) the
    training script's `args` or RETFound's exact ViT-L/16 shapes tell it from a plain timm file."""
    if any(k.startswith(("decoder", "mask_token")) for k in model):
        return True
    args = checkpoint.get("args")
    if args is not None and any(hasattr(args, name) for name in _MAE_ARGS):
        return True
    state = _strip(model, ("module.",))
    return all(k in state and tuple(state[k].shape) == shape for k, shape in _RETFOUND_SHAPES.items())


def normalisation_name(mean: Any) -> str:
    """'ImageNet' or 'modality' for printing which input statistics an encoder expects."""
    return "ImageNet" if tuple(round(float(m), 3) for m in mean) == IMAGENET_MEAN else "modality"


def _strip(state: dict[str, Tensor], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def _drop(state: dict[str, Tensor], patterns: tuple[str, ...]) -> tuple[dict[str, Tensor], list[str]]:
    kept = {k: v for k, v in state.items() if not any(re.match(p, k) for p in patterns)}
    return kept, sorted(set(state) - set(kept))


def convert_visionfm(checkpoint: dict[str, Any]) -> tuple[dict[str, Tensor], list[str]]:
    state = _tensors(checkpoint.get("teacher")) or _tensors(checkpoint.get("student"))
    state = _strip(state, ("module.", "backbone."))
    return _drop(state, (r"head\.", r"masked_embed$"))


def convert_retfound_mae(checkpoint: dict[str, Any]) -> tuple[dict[str, Tensor], list[str]]:
    state = _strip(_tensors(checkpoint.get("model")) or _tensors(checkpoint), ("module.",))
    state, dropped = _drop(state, (r"decoder", r"mask_token$", r"head\."))
    if "norm.weight" not in state and "fc_norm.weight" in state:
        # A global-pool fine-tuned RETFound keeps its final norm as fc_norm; use it as the token norm.
        state["norm.weight"], state["norm.bias"] = state.pop("fc_norm.weight"), state.pop("fc_norm.bias")
    return state, dropped


def convert_retfound_dinov2(checkpoint: dict[str, Any]) -> tuple[dict[str, Tensor], list[str]]:
    teacher = _tensors(checkpoint.get("teacher")) or _tensors(checkpoint)
    backbone = {k: v for k, v in teacher.items() if not k.startswith(("dino_head.", "ibot_head."))}
    dropped = sorted(set(teacher) - set(backbone))
    state: dict[str, Tensor] = {}
    for key, value in _strip(backbone, ("module.", "backbone.")).items():
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)  # FSDP chunks: blocks.<chunk>.<i>.
        key = key.replace("mlp.w12.", "mlp.fc1.").replace("mlp.w3.", "mlp.fc2.")
        state[key] = value
    if "register_tokens" in state:
        raise CheckpointError("<checkpoint>", "DINOv2 register tokens are not supported by this importer")
    state, more = _drop(state, (r"mask_token$",))
    return state, dropped + more


CONVERTERS: dict[str, Callable[[dict[str, Any]], tuple[dict[str, Tensor], list[str]]]] = {
    "visionfm": convert_visionfm,
    "retfound_mae": convert_retfound_mae,
    "retfound_dinov2": convert_retfound_dinov2,
    "timm": lambda ckpt: _drop(
        _strip(
            _tensors(ckpt.get("model"))
            or _tensors(ckpt.get("visionfm_state_dict"))
            or _tensors(ckpt.get("state_dict"))
            or _tensors(ckpt),
            ("module.", "backbone."),
        ),
        (r"head\.", r"fc_norm\.", r"head_drop"),
    ),
}


@dataclass(frozen=True)
class InferredArchitecture:
    """A timm ViT that the state dict fits, read from tensor shapes."""

    arch: str
    timm_name: str
    timm_kwargs: dict[str, Any]
    image_size: int
    patch_size: int


def _heads_for(embed_dim: int, depth: int) -> int:
    for _, dim, layers, heads in ARCHITECTURES.values():
        if dim == embed_dim and layers == depth:
            return heads
    standard = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1536: 24}
    if embed_dim in standard:
        return standard[embed_dim]
    if embed_dim % 64 == 0:
        return embed_dim // 64
    raise ConfigError("num_heads", f"cannot infer the attention heads of a {embed_dim}-d ViT; pass num_heads")


def infer_architecture(state: dict[str, Tensor], num_heads: int | None = None) -> InferredArchitecture:
    """Embed dim, depth, patch, grid, MLP width, layer scale and SwiGLU from the weights' shapes."""
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise CheckpointError("<checkpoint>", f"not a ViT encoder: no '{key}' after key mapping")
    embed_dim = int(state["cls_token"].shape[-1])
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    grid = math.isqrt(int(state["pos_embed"].shape[1]) - 1)
    if grid * grid != int(state["pos_embed"].shape[1]) - 1:
        raise CheckpointError(
            "<checkpoint>",
            f"position embedding of {state['pos_embed'].shape[1]} tokens is not a square grid plus [CLS]",
        )
    hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0])
    swiglu = int(state["blocks.0.mlp.fc2.weight"].shape[1]) * 2 == hidden
    kwargs: dict[str, Any] = {
        "pretrained": False,
        "num_classes": 0,
        "global_pool": "token",
        "img_size": grid * patch,
        "patch_size": patch,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads or _heads_for(embed_dim, depth),
        # timm computes int(mlp_ratio * dim): a hair above the exact ratio survives float rounding.
        "mlp_ratio": (hidden + 0.5) / embed_dim,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "dynamic_img_size": True,
    }
    layer_scale = "blocks.0.ls1.gamma" in state
    kwargs["init_values"] = 1e-5 if layer_scale else None  # any value creates the LayerScale weights
    arch = next(
        (
            name
            for name, (_, dim, layers, _) in ARCHITECTURES.items()
            if dim == embed_dim and layers == depth and not swiglu and not layer_scale
        ),
        "custom",
    )
    if swiglu:
        # timm's registered DINOv2-giant is the ViT with packed SwiGLU (fc1 holds both halves).
        timm_name = "vit_giant_patch14_dinov2"
    elif layer_scale:
        timm_name = "vit_large_patch14_dinov2"
    else:
        timm_name = ARCHITECTURES[arch][0] if arch != "custom" else "vit_base_patch16_224"
    return InferredArchitecture(arch, timm_name, kwargs, grid * patch, patch)


InputSize = int | Sequence[int]


def input_hw(size: InputSize) -> tuple[int, int]:
    """(height, width) of an input size given as one side (square) or as (height, width)."""
    if isinstance(size, int):
        return size, size
    height, width = (int(v) for v in size)
    return height, width


def resample_position_embedding(
    state: dict[str, Tensor], image_size: InputSize, patch_size: int, old_size: InputSize | None = None
) -> dict[str, Tensor]:
    """``pos_embed`` resampled (bicubic) from the patch grid of ``old_size`` (default: a square grid)
    to that of ``image_size`` (a side, or (height, width) for a non-square input); other weights
    untouched."""
    height, width = input_hw(image_size)
    if height % patch_size or width % patch_size:
        raise ConfigError("image_size", f"{height}x{width} is not a multiple of patch size {patch_size}")
    new_grid = [height // patch_size, width // patch_size]
    pos = state["pos_embed"]
    if old_size is None:
        side = round(math.sqrt(pos.shape[1] - 1))
        old_grid = [side, side]
    else:
        old_h, old_w = input_hw(old_size)
        old_grid = [old_h // patch_size, old_w // patch_size]
    if old_grid == new_grid and pos.shape[1] == new_grid[0] * new_grid[1] + 1:
        return state
    resized = resample_abs_pos_embed(pos.float(), new_size=new_grid, old_size=old_grid, num_prefix_tokens=1)
    return {**state, "pos_embed": resized.to(pos.dtype)}


def build_encoder(
    state: dict[str, Tensor],
    timm_name: str,
    timm_kwargs: dict[str, Any],
    image_size: InputSize | None = None,
    source: str = "<checkpoint>",
) -> tuple[nn.Module, dict[str, Any]]:
    """A timm encoder holding ``state`` strictly, at ``image_size`` (a side, or (height, width)) if
    given; returns the kwargs used (``img_size`` an int when square, [height, width] otherwise)."""
    kwargs = dict(timm_kwargs)
    if image_size is not None:
        height, width = input_hw(image_size)
        wanted: int | list[int] = height if height == width else [height, width]
        old = kwargs.get("img_size")
        if old is None or input_hw(old) != (height, width):
            state = resample_position_embedding(state, (height, width), int(kwargs["patch_size"]), old)
            kwargs["img_size"] = wanted
    model: nn.Module = timm.create_model(timm_name, **kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(source, f"weights do not fit {timm_name}: {str(exc).splitlines()[0]}") from exc
    return model, kwargs


@dataclass
class ImportResult:
    """Encoder weights (timm keys) with our checkpoint metadata, and what the import did."""

    state: dict[str, Tensor]
    metadata: dict[str, Any]
    source_format: str
    dropped_keys: list[str] = field(default_factory=list)
    source_image_size: int = 0


def import_encoder(
    path: str | Path,
    modality: str,
    source_format: str = "auto",
    image_size: int | None = None,
    trust: bool = False,
    num_heads: int | None = None,
) -> ImportResult:
    """Read an upstream checkpoint and return encoder weights that load strictly into our timm ViT.

    RETFound weights were trained on ImageNet-normalised inputs, so their metadata records ImageNet's
    mean/std; VisionFM weights record the modality's own values.
    """
    name = str(path)
    checkpoint = load_checkpoint(path, trust=trust)
    try:
        detected = detect_format(checkpoint)
    except CheckpointError as exc:
        raise CheckpointError(name, exc.reason) from exc
    chosen = detected if source_format == "auto" else source_format
    if chosen not in CONVERTERS:
        raise ConfigError("format", f"unknown source format {source_format!r}; use auto or {', '.join(SOURCE_FORMATS)}")
    try:
        state, dropped = CONVERTERS[chosen](checkpoint)
        inferred = infer_architecture(state, num_heads)
    except CheckpointError as exc:
        raise CheckpointError(name, f"{exc.reason} (read as {chosen}; detected {detected})") from exc
    model, kwargs = build_encoder(state, inferred.timm_name, inferred.timm_kwargs, image_size, name)
    mod = get_modality(modality)
    imagenet = chosen.startswith("retfound")
    size = int(kwargs["img_size"])
    metadata = {
        "format_version": FORMAT_VERSION,
        "modality": mod.name,
        "arch": inferred.arch,
        "timm_name": inferred.timm_name,
        "timm_kwargs": kwargs,
        "image_size": size,
        "patch_size": inferred.patch_size,
        "mean": list(IMAGENET_MEAN if imagenet else mod.mean),
        "std": list(IMAGENET_STD if imagenet else mod.std),
        "source_format": chosen,
        "source_image_size": inferred.image_size,
    }
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return ImportResult(weights, metadata, chosen, dropped, inferred.image_size)
