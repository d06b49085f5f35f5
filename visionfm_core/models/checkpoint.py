"""Encoder checkpoints: one `<modality>.safetensors` per encoder, timm key names, JSON metadata.

The file loads into `timm.create_model(meta["timm_name"], **meta["timm_kwargs"])` with strict=True.
Writes go to a temporary file in the same folder and are renamed into place, so a crash never
leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from visionfm_core.errors import CheckpointError
from visionfm_core.models.encoders import EncoderSpec

METADATA_KEY = "visionfm"
FORMAT_VERSION = 1


def encoder_metadata(spec: EncoderSpec, modality: str, **extra: Any) -> dict[str, Any]:
    """Metadata stored with an encoder: modality, architecture, sizes, normalisation and anything extra."""
    from visionfm_core.modalities import get_modality

    mod = get_modality(modality)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "modality": mod.name,
        "arch": spec.arch,
        "timm_name": spec.timm_name,
        "timm_kwargs": spec.timm_kwargs(),
        "image_size": spec.image_size,
        "patch_size": spec.patch_size,
        "mean": list(mod.mean),
        "std": list(mod.std),
    }
    meta.update(extra)
    return meta


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call `write(tmp_path)` then rename the result onto `path` (same folder, so the rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_encoder(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write encoder weights (timm keys) and metadata to a safetensors file, atomically."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    header = {METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    atomic_write_bytes(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    return path


def read_json_header(path: str | Path, key: str, missing: str) -> dict[str, Any]:
    """The JSON object stored under `key` in a safetensors header, without loading tensors; `missing`
    is the CheckpointError reason when the file has no such entry."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(key)
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise CheckpointError(str(path), f"not a readable safetensors file ({exc})") from exc
    if raw is None:
        raise CheckpointError(str(path), missing)
    meta: dict[str, Any] = json.loads(raw)
    return meta


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of an encoder checkpoint without loading its tensors."""
    return read_json_header(path, METADATA_KEY, f"no '{METADATA_KEY}' metadata (not a visionfm-fed encoder)")


def load_encoder(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and metadata of an encoder checkpoint."""
    meta = read_metadata(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(str(path), f"corrupt tensors ({exc})") from exc
    return state, meta


def build_encoder_from_checkpoint(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A timm encoder with the checkpoint's weights loaded strictly."""
    import timm

    state, meta = load_encoder(path)
    model = timm.create_model(meta["timm_name"], **meta["timm_kwargs"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(str(path), f"weights do not fit {meta['timm_name']}: {exc}") from exc
    return model, meta
