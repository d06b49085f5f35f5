"""What users do with our weights: the README's loading recipe as written, timm exports without
foreign tags, and RETFound files recognised (and normalised) whether or not they keep MAE's decoder."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from typer.testing import CliRunner

import visionfm_core
from tests.unit.tasks.helpers import single_torch_thread, tiny_encoder  # noqa: F401  (autouse fixture)
from visionfm_core.cli import build_app
from visionfm_core.models.checkpoint import encoder_metadata, save_encoder
from visionfm_core.models.encoders import EncoderSpec
from visionfm_core.models.exporters import export_timm_folder
from visionfm_core.models.importers import IMAGENET_MEAN, IMAGENET_STD, detect_format, import_encoder

README = Path(visionfm_core.__file__).parent.parent / "README.md"


def _readme_recipe() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    recipes = [b for b in blocks if 'meta["timm_name"]' in b]
    assert len(recipes) == 1, "the README should hold exactly one encoder-loading recipe"
    return recipes[0]


def test_the_readme_recipe_loads_an_encoder_as_written(tmp_path: Path) -> None:
    encoder = tiny_encoder(32).eval()
    path = save_encoder(tmp_path / "fundus.safetensors", encoder.state_dict(),
                        encoder_metadata(EncoderSpec("nano", 32), "fundus"))
    recipe = _readme_recipe()
    documented = re.search(r'^path = "([^"]+)"$', recipe, flags=re.M)
    assert documented is not None and documented.group(1).endswith("encoders/fundus.safetensors")
    namespace: dict[str, object] = {}
    exec(recipe.replace(documented.group(1), str(path)), namespace)  # our own README, run as a user would
    model = namespace["model"]
    assert isinstance(model, torch.nn.Module)
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(images), encoder(images))
    assert namespace["mean"] == encoder_metadata(EncoderSpec("nano", 32), "fundus")["mean"]


def test_a_timm_export_carries_no_imagenet_tag(tmp_path: Path) -> None:
    encoder = tiny_encoder(32)
    folder = export_timm_folder(encoder.state_dict(), encoder_metadata(EncoderSpec("nano", 32), "oct"),
                                tmp_path / "export")
    text = (folder / "config.json").read_text()
    config = json.loads(text)
    assert "in1k" not in text and "in21k" not in text and "augreg" not in text
    for key in ("tag", "hf_hub_id", "license", "url"):
        assert key not in config["pretrained_cfg"], key
    assert config["visionfm"]["modality"] == "oct"


def _retfound_without_decoder(path: Path) -> Path:
    """RETFound's encoder-only layout: MAE's training script's keys, no decoder, no mask token."""
    torch.save({"model": tiny_encoder(32).state_dict(), "epoch": 49,
                "args": argparse.Namespace(model="vit_large_patch16", mask_ratio=0.75, norm_pix_loss=True,
                                           blr=1.5e-4, accum_iter=1)}, path)
    return path


def test_retfound_without_decoder_keys_gets_imagenet_normalisation(tmp_path: Path) -> None:
    result = import_encoder(_retfound_without_decoder(tmp_path / "RETFound_oct.pth"), "oct")
    assert result.source_format == "retfound_mae"
    assert tuple(result.metadata["mean"]) == IMAGENET_MEAN and tuple(result.metadata["std"]) == IMAGENET_STD
    plain = tmp_path / "plain.pth"
    torch.save({"model": tiny_encoder(32).state_dict(), "epoch": 3}, plain)
    assert import_encoder(plain, "oct").source_format == "timm"  # a small ViT of no known release


def _vit_large_shapes() -> dict[str, torch.Tensor]:
    """RETFound's ViT-L/16 shapes without allocating its 300M parameters (meta tensors)."""
    shapes = {"cls_token": (1, 1, 1024), "pos_embed": (1, 197, 1024), "patch_embed.proj.weight": (1024, 3, 16, 16),
              "patch_embed.proj.bias": (1024,), "fc_norm.weight": (1024,), "head.weight": (5, 1024)}
    for block in range(24):
        shapes[f"blocks.{block}.mlp.fc1.weight"] = (4096, 1024)
        shapes[f"blocks.{block}.mlp.fc2.weight"] = (1024, 4096)
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def test_retfound_is_recognised_from_its_shapes_alone() -> None:
    assert detect_format({"model": _vit_large_shapes()}) == "retfound_mae"  # a fine-tuned RETFound
    small = {k: v for k, v in _vit_large_shapes().items() if not k.startswith("blocks.23")}
    assert detect_format({"model": small}) == "timm"


def test_weights_import_prints_the_format_it_chose(tmp_path: Path) -> None:
    source = _retfound_without_decoder(tmp_path / "RETFound_oct.pth")
    result = CliRunner().invoke(build_app(), ["weights", "import", str(source), str(tmp_path / "o.safetensors"),
                                              "--modality", "oct"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"read {source} as retfound_mae (detected); ImageNet normalisation" in result.output
