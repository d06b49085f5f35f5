"""A fine-tuned task model in one safetensors file: encoder and head weights plus everything needed
to rebuild and run it (task, head, encoder architecture, preprocessing) as JSON metadata.

Keys: ``encoder.<timm key>`` and ``head.<key>``. The encoder part is a plain timm state dict, so
``load_task_model(...).model.encoder`` can be exported like any encoder checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from visionfm_core.errors import CheckpointError, ConfigError
from visionfm_core.models.checkpoint import atomic_write_bytes, read_json_header
from visionfm_core.models.heads import TaskModel, build_head
from visionfm_core.tasks.adapters import TaskAdapter, task_from_config
from visionfm_core.tasks.data import Preprocess

TASK_METADATA_KEY = "visionfm_task"
TASK_FORMAT_VERSION = 1


@dataclass
class LoadedTaskModel:
    model: TaskModel
    task: TaskAdapter
    preprocess: Preprocess
    metadata: dict[str, Any]

    @property
    def encoder_metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = self.metadata["encoder"]
        return meta


def save_task_model(
    path: str | Path,
    model: TaskModel,
    task: TaskAdapter,
    preprocess: Preprocess,
    encoder_metadata: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the model atomically; ``encoder_metadata`` must hold ``timm_name`` and ``timm_kwargs``."""
    for key in ("timm_name", "timm_kwargs"):
        if key not in encoder_metadata:
            raise ConfigError(f"encoder.{key}", "missing from the encoder metadata")
    path = Path(path)
    tensors = {f"encoder.{k}": v.detach().to("cpu").contiguous() for k, v in model.encoder.state_dict().items()}
    tensors.update({f"head.{k}": v.detach().to("cpu").contiguous() for k, v in model.head.state_dict().items()})
    metadata = {
        "format_version": TASK_FORMAT_VERSION,
        "task": {"kind": task.kind, "config": task.to_config()},
        "head": {"kind": model.head.kind, "config": model.head.config},
        "encoder": encoder_metadata,
        "preprocess": preprocess.to_dict(),
        "freeze_encoder": model.freeze_encoder,
        **(extra or {}),
    }
    header = {TASK_METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    atomic_write_bytes(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    return path


def read_task_metadata(path: str | Path) -> dict[str, Any]:
    return read_json_header(path, TASK_METADATA_KEY, "no task metadata: not a fine-tuned visionfm task model")


def _part(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _mismatch(module: torch.nn.Module, state: dict[str, Tensor], prefix: str, limit: int = 4) -> str:
    """The keys that keep ``state`` from loading into ``module``, named (PyTorch's own message puts
    them on later lines, which a one-line error would drop); empty when it fits."""
    own = module.state_dict()
    groups = {
        "missing": sorted(k for k in own if k not in state),
        "unexpected": sorted(k for k in state if k not in own),
        "wrong shape": sorted(k for k, v in state.items() if k in own and v.shape != own[k].shape),
    }
    problems = []
    for label, keys in groups.items():
        if keys:
            shown = ", ".join(prefix + k for k in keys[:limit])
            problems.append(f"{label} {shown}" + (f" and {len(keys) - limit} more" if len(keys) > limit else ""))
    return "; ".join(problems)


def load_task_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedTaskModel:
    """Rebuild encoder, head and task adapter from a file written by :func:`save_task_model`."""
    name = str(path)
    metadata = read_task_metadata(path)
    try:
        state = load_file(name)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(name, f"corrupt tensors ({exc})") from exc
    try:
        task = task_from_config(metadata["task"]["kind"], metadata["task"]["config"])
        head = build_head(metadata["head"]["kind"], metadata["head"]["config"])
        encoder = timm.create_model(metadata["encoder"]["timm_name"], **metadata["encoder"]["timm_kwargs"])
        for module, prefix in ((encoder, "encoder."), (head, "head.")):
            weights = _part(state, prefix)
            problems = _mismatch(module, weights, prefix)
            if problems:
                config = metadata["head"]["config"] if prefix == "head." else metadata["encoder"]["timm_kwargs"]
                raise CheckpointError(name, f"the stored weights do not fit the {prefix[:-1]} its metadata "
                                            f"describes ({config}): {problems}")
            module.load_state_dict(weights, strict=True)
    except (KeyError, RuntimeError, ConfigError) as exc:
        raise CheckpointError(name, f"cannot rebuild the task model: {str(exc).splitlines()[0]}") from exc
    model = TaskModel(encoder, head, freeze_encoder=bool(metadata.get("freeze_encoder", False))).to(device)
    model.eval()
    return LoadedTaskModel(model, task, Preprocess.from_dict(metadata["preprocess"]), metadata)
