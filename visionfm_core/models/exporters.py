"""Export our encoders for use outside this project.

- ``export_timm_folder``: timm's own Hugging Face layout (``config.json`` + ``model.safetensors``),
  loadable offline with ``timm.create_model("local-dir:<folder>", pretrained=True)``; the
  normalisation goes into the config's ``mean``/``std`` so timm's data config picks it up.
- ``export_visionfm``: VisionFM's pretraining layout (``teacher`` with ``backbone.`` keys, ``student``
  with ``module.backbone.``), which VisionFM's own fine-tuning code loads. It holds tensors and an
  integer only, so it opens with ``torch.load(weights_only=True)``.
Our own single-file checkpoint (timm keys + JSON metadata) is `visionfm_core.models.checkpoint`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import save_for_hf
from torch import Tensor

from visionfm_core.errors import CheckpointError
from visionfm_core.models.checkpoint import atomic_write_bytes

FOREIGN_PRETRAINED_KEYS = (
    "tag", "hf_hub_id", "hf_hub_filename", "url", "file", "license", "paper_ids", "paper_name",
    "origin_url", "notes", "source",
)


def _model(state: dict[str, Tensor], metadata: dict[str, Any]) -> torch.nn.Module:
    model: torch.nn.Module = timm.create_model(metadata["timm_name"], **metadata["timm_kwargs"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(metadata["timm_name"], f"weights do not fit: {str(exc).splitlines()[0]}") from exc
    return model


def export_timm_folder(state: dict[str, Tensor], metadata: dict[str, Any], folder: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` in timm's hub layout; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = _model(state, metadata)
    model_args = {k: v for k, v in metadata["timm_kwargs"].items() if k != "pretrained"}
    height, width = metadata.get("input_shape") or (metadata["image_size"], metadata["image_size"])
    save_for_hf(
        model,
        str(folder),
        model_args=model_args,
        safe_serialization=True,
        model_config={"visionfm": {k: metadata[k] for k in ("modality", "arch", "format_version") if k in metadata}},
        data_config={
            "input_size": (3, int(height), int(width)),
            "mean": tuple(metadata["mean"]),
            "std": tuple(metadata["std"]),
            "crop_pct": 1.0,
            "interpolation": "bicubic",
        },
    )
    config = json.loads((folder / "config.json").read_text())
    if "architecture" not in config:
        raise CheckpointError(str(folder), "timm wrote no architecture into config.json")
    # timm copies the registered model's pretrained tag, hub id, licence and paper links (e.g. an
    # ImageNet "augreg2_in21k_ft_in1k" tag); they describe timm's weights, not these.
    pretrained = config.get("pretrained_cfg", {})
    for key in FOREIGN_PRETRAINED_KEYS:
        pretrained.pop(key, None)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


def export_visionfm(state: dict[str, Tensor], path: str | Path) -> Path:
    """Write a ``.pth`` in VisionFM's pretraining layout (no pickled Python objects besides dicts)."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    checkpoint = {
        "teacher": {f"backbone.{k}": v for k, v in tensors.items()},
        "student": {f"module.backbone.{k}": v for k, v in tensors.items()},
        "epoch": 0,
    }
    atomic_write_bytes(path, lambda tmp: torch.save(checkpoint, tmp))
    return path
