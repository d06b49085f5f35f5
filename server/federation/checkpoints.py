"""Per-round global checkpoints and resume.

Round k is saved as `checkpoints/round-000k/`: one `<modality>.safetensors` per encoder (timm keys,
loadable with strict=True), the projection heads in `<modality>.head.safetensors`, and `round.json`
written last. A round folder without `round.json` is incomplete (the coordinator died while writing)
and is ignored, so resume always starts from the last round that was fully aggregated and saved.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visionfm_core.models.checkpoint import atomic_write_bytes, encoder_metadata, load_encoder, save_encoder
from visionfm_core.models.encoders import EncoderSpec

BACKBONE = "backbone."
MARKER = "round.json"


def round_dir(out_dir: Path, server_round: int) -> Path:
    return out_dir / "checkpoints" / f"round-{server_round:04d}"


def _split(arrays: dict[str, np.ndarray], modality: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    prefix = f"{modality}/"
    backbone, rest = {}, {}
    for key, value in arrays.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        if name.startswith(BACKBONE):
            backbone[name[len(BACKBONE):]] = tensor
        else:
            rest[name] = tensor
    return backbone, rest


def save_encoders(folder: Path, arrays: dict[str, np.ndarray], modalities: list[str], spec: EncoderSpec,
                  **meta: Any) -> list[Path]:
    """Write one timm-loadable encoder (and its head, if any) per modality into `folder`."""
    written = []
    for modality in modalities:
        backbone, rest = _split(arrays, modality)
        if not backbone:
            continue
        metadata = encoder_metadata(spec, modality, **meta)
        written.append(save_encoder(folder / f"{modality}.safetensors", backbone, metadata))
        if rest:
            save_encoder(folder / f"{modality}.head.safetensors", rest, {**metadata, "part": "ssl-head"})
    return written


def save_round(out_dir: Path, server_round: int, arrays: dict[str, np.ndarray], modalities: list[str],
               spec: EncoderSpec, info: dict[str, Any]) -> Path:
    """Checkpoint the global model after `server_round`; the marker file makes it count for resume."""
    folder = round_dir(out_dir, server_round)
    if folder.exists():
        shutil.rmtree(folder)
    save_encoders(folder, arrays, modalities, spec, round=server_round, **info)
    payload = json.dumps({"round": server_round, **info}, indent=2, sort_keys=True).encode()
    atomic_write_bytes(folder / MARKER, lambda tmp: Path(tmp).write_bytes(payload))
    return folder


def latest_round(out_dir: Path) -> int | None:
    """The last fully written round, or None when there is none."""
    rounds = []
    for folder in (out_dir / "checkpoints").glob("round-*"):
        if (folder / MARKER).is_file():
            rounds.append(int(folder.name.split("-")[1]))
    return max(rounds) if rounds else None


def load_round(out_dir: Path, server_round: int) -> dict[str, np.ndarray]:
    """The global arrays ("<modality>/backbone.*", "<modality>/head.*") saved after `server_round`."""
    folder = round_dir(out_dir, server_round)
    arrays: dict[str, np.ndarray] = {}
    for path in sorted(folder.glob("*.safetensors")):
        state, meta = load_encoder(path)
        modality = meta["modality"]
        is_head = path.name.endswith(".head.safetensors")
        for key, value in state.items():
            name = key if is_head else BACKBONE + key
            arrays[f"{modality}/{name}"] = value.numpy()
    return arrays
