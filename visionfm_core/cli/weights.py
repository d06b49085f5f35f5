"""`visionfm weights import | export | inspect`: bring released weights in, hand ours out, look inside."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from visionfm_core.cli.common import console, emit_json, reports_errors
from visionfm_core.errors import CheckpointError, ConfigError

weights_app = typer.Typer(
    help="Import VisionFM / RETFound weights, export ours, inspect any weights file.", no_args_is_help=True
)


def _encoder_of(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Encoder weights and metadata from our encoder checkpoint or a fine-tuned task model."""
    from visionfm_core.models.checkpoint import load_encoder
    from visionfm_core.tasks.persistence import load_task_model, read_task_metadata

    try:
        read_task_metadata(path)
    except CheckpointError:
        return load_encoder(path)
    loaded = load_task_model(path)
    return dict(loaded.model.encoder.state_dict()), loaded.encoder_metadata


@weights_app.command("import")
@reports_errors
def import_command(
    source: Annotated[Path, typer.Argument(help="VFM_<Modality>_weights.pth, a RETFound .pth, or a timm state dict")],
    out: Annotated[Path, typer.Argument(help="encoder checkpoint to write (.safetensors)")],
    modality: Annotated[str, typer.Option(help="the modality these weights were trained on")],
    source_format: Annotated[
        str, typer.Option("--format", help="auto | visionfm | retfound_mae | retfound_dinov2 | timm")
    ] = "auto",
    image_size: Annotated[int | None, typer.Option(help="resample the position embedding to this input size")] = None,
    num_heads: Annotated[int | None, typer.Option(help="attention heads, if not standard for the width")] = None,
    trust: Annotated[
        bool,
        typer.Option(
            help="fully unpickle a file you trust (it can run code); only needed "
            "when the allow-listed load refuses the file"
        ),
    ] = False,
) -> None:
    """Convert released weights into our encoder checkpoint (timm keys, strict load verified)."""
    from visionfm_core.models.checkpoint import save_encoder
    from visionfm_core.models.importers import import_encoder, normalisation_name

    result = import_encoder(source, modality, source_format, image_size, trust, num_heads)
    save_encoder(out, result.state, result.metadata)
    how = "detected" if source_format == "auto" else "as asked"
    console.print(f"read {source} as {result.source_format} ({how}); "
                  f"{normalisation_name(result.metadata['mean'])} normalisation", markup=False, highlight=False)
    emit_json(
        {
            "written": str(out),
            "source_format": result.source_format,
            "arch": result.metadata["arch"],
            "timm_name": result.metadata["timm_name"],
            "image_size": result.metadata["image_size"],
            "source_image_size": result.source_image_size,
            "dropped_keys": len(result.dropped_keys),
            "tensors": len(result.state),
        }
    )


@weights_app.command("export")
@reports_errors
def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="our encoder checkpoint or a fine-tuned task model")],
    out: Annotated[Path, typer.Argument(help="timm: a folder (config.json + model.safetensors); visionfm: a .pth")],
    target: Annotated[str, typer.Option("--format", help="timm | visionfm")] = "timm",
) -> None:
    """Export an encoder for timm (`timm.create_model("local-dir:OUT", pretrained=True)`) or VisionFM."""
    from visionfm_core.models.exporters import export_timm_folder, export_visionfm

    state, metadata = _encoder_of(checkpoint)
    if target == "timm":
        export_timm_folder(state, metadata, out)
    elif target == "visionfm":
        export_visionfm(state, out)
    else:
        raise ConfigError("format", f"unknown export format {target!r}; use timm or visionfm")
    console.print(f"exported {checkpoint.name} as {target}: {out}")


def _summary(state: dict[str, Any]) -> dict[str, Any]:
    import torch

    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return {"tensors": len(tensors), "parameters": int(sum(v.numel() for v in tensors.values()))}


@weights_app.command("inspect")
@reports_errors
def inspect_command(
    path: Annotated[Path, typer.Argument(help="any weights file: .safetensors (ours) or a torch .pth")],
) -> None:
    """Describe a weights file without trusting it: format, architecture, size, what a .pth would unpickle."""
    from safetensors.torch import load_file

    from visionfm_core.models.checkpoint import read_metadata
    from visionfm_core.models.importers import (
        CONVERTERS,
        detect_format,
        infer_architecture,
        load_checkpoint,
        unsafe_globals,
    )
    from visionfm_core.tasks.persistence import read_task_metadata

    if not path.is_file():
        raise CheckpointError(str(path), "file not found")
    info: dict[str, Any] = {"file": path.name}
    if path.suffix == ".safetensors":
        try:
            info.update(kind="task model", metadata=read_task_metadata(path))
        except CheckpointError:
            info.update(kind="encoder", metadata=read_metadata(path))
        info.update(_summary(load_file(str(path))))
        emit_json(info)
        return
    needed = unsafe_globals(path)
    info["kind"] = "torch pickle"
    info["needs_trust"] = needed
    if needed:
        info["note"] = "refused without --trust: it would import the objects listed in needs_trust"
        emit_json(info)
        return
    checkpoint = load_checkpoint(path)
    info["top_level_keys"] = sorted(str(k) for k in checkpoint)[:20]
    source_format = detect_format(checkpoint)
    state, dropped = CONVERTERS[source_format](checkpoint)
    arch = infer_architecture(state)
    info.update(
        source_format=source_format,
        arch=arch.arch,
        timm_name=arch.timm_name,
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        embed_dim=arch.timm_kwargs["embed_dim"],
        depth=arch.timm_kwargs["depth"],
        encoder=_summary(state),
        dropped_keys=len(dropped),
    )
    emit_json(info)
