"""The folded segmentation decoders (``FoldedUNETRHead``, task decoders "folded-reduce", the default,
"folded" and "folded-lean"): logits at the input's own size, no convolution at full resolution,
one-pixel detail kept through the fold, and models saved with the previous decoders (light, or folded
before the fusion option) still loading and predicting exactly as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from tests.synthetic_fundus import synthetic_fundus
from tests.unit.tasks.helpers import random_label_manifest, tiny_encoder
from visionfm_core.cli import build_app
from visionfm_core.errors import CheckpointError, ConfigError
from visionfm_core.models.encoders import EncoderSpec
from visionfm_core.models.heads import (
    FUSES,
    EncoderFeatures,
    FoldedUNETRHead,
    LightUNETRHead,
    TaskHead,
    TaskModel,
    build_head,
)
from visionfm_core.tasks.adapters import SegmentationTask
from visionfm_core.tasks.adapters.segmentation import DECODER_FEATURES, FOLDED_FUSE
from visionfm_core.tasks.data import Preprocess
from visionfm_core.tasks.persistence import load_task_model, save_task_model


def _features(head: TaskHead, height: int, width: int, batch: int = 2, embed_dim: int = 32) -> EncoderFeatures:
    """Encoder output as a patch-16 ViT would give it (the maps' size rounds up)."""
    grid = (-(-height // 16), -(-width // 16))
    maps = {block: torch.randn(batch, embed_dim, *grid) for block in head.blocks}
    return EncoderFeatures(cls={}, maps=maps, image=torch.randn(batch, 3, height, width))


@pytest.mark.parametrize(("height", "width"), [(32, 32), (48, 80), (33, 47), (17, 64)])
@pytest.mark.parametrize("num_classes", [2, 5])
def test_logits_at_the_input_size_for_any_size(height: int, width: int, num_classes: int) -> None:
    torch.manual_seed(0)
    head = FoldedUNETRHead(32, 2, num_classes, features=8)
    assert head(_features(head, height, width)).shape == (2, num_classes, height, width)


def test_through_the_encoder_on_a_non_square_input() -> None:
    torch.manual_seed(0)
    model = TaskModel(tiny_encoder(32), FoldedUNETRHead(32, 2, 3, features=8))
    assert model(torch.randn(1, 3, 48, 80)).shape == (1, 3, 48, 80)


def _convolution_inputs(head: TaskHead, height: int, width: int) -> list[tuple[int, int]]:
    sizes: list[tuple[int, int]] = []
    hooks = [
        module.register_forward_hook(lambda _m, args, _out: sizes.append(tuple(args[0].shape[-2:])))
        for module in head.modules()
        if isinstance(module, nn.Conv2d)
    ]
    with torch.no_grad():
        head(_features(head, height, width, batch=1))
    for hook in hooks:
        hook.remove()
    return sizes


def test_no_convolution_runs_at_full_resolution() -> None:
    # The point of the design: a narrow decoder's time goes to full-resolution convolutions.
    folded = _convolution_inputs(FoldedUNETRHead(32, 2, 2, features=8), 64, 96)
    light = _convolution_inputs(LightUNETRHead(32, 2, 2, features=4), 64, 96)
    assert (64, 96) in light  # the previous decoder does, so the check can fail
    assert folded and max(folded) == (32, 48)


@pytest.mark.parametrize("fuse", FUSES)
def test_one_pixel_detail_survives_the_fold(fuse: str) -> None:
    # Targets that differ between the four pixels of every 2x2 block (bright single pixels at random
    # places): only a decoder that keeps full resolution can fit them, whichever fusion it has.
    torch.manual_seed(0)
    head = FoldedUNETRHead(32, 2, 2, features=8, fuse=fuse)
    features = _features(head, 32, 32, batch=4)
    dots = torch.rand(4, 32, 32) < 0.15
    features.image = torch.randn(4, 3, 32, 32) * 0.1 + dots[:, None].float() * 2.0
    target = dots.long()
    assert any(block.sum() not in (0, 4) for block in target.unfold(1, 2, 2).unfold(2, 2, 2).reshape(-1, 4))
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(150):
        loss = nn.functional.cross_entropy(head(features), target, weight=torch.tensor([1.0, 4.0]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        predicted = head(features).argmax(1)
    true_pos = int((predicted.bool() & dots).sum())
    dice = 2 * true_pos / (int(predicted.sum()) + int(dots.sum()))
    assert dice > 0.95


def test_folded_head_rebuilds_from_its_config() -> None:
    head = FoldedUNETRHead(32, 2, 4, features=16, context=24)
    rebuilt = build_head(head.kind, head.config)
    assert isinstance(rebuilt, FoldedUNETRHead) and rebuilt.config == head.config
    assert rebuilt.state_dict().keys() == head.state_dict().keys()
    assert FoldedUNETRHead(32, 2, 2, features=16).config["context"] == 16  # as wide as features, stored


def test_segmentation_defaults_to_the_reduced_folded_decoder_and_each_decoder_has_its_width() -> None:
    task = SegmentationTask(2)
    assert task.decoder == "folded-reduce" and task.features == DECODER_FEATURES["folded-reduce"] == 32
    head = task.build_head(32, 2, 16, "full")
    assert isinstance(head, FoldedUNETRHead) and head.config["features"] == head.config["context"] == 32
    assert head.config["fuse"] == "reduce"
    assert SegmentationTask.from_config(task.to_config()) == task
    for decoder, fuse in FOLDED_FUSE.items():  # "folded" is the plain fusion, as before the option
        folded = SegmentationTask(2, decoder=decoder).build_head(32, 2, 16, "full")
        assert isinstance(folded, FoldedUNETRHead) and folded.config.get("fuse", "conv") == fuse
    light = SegmentationTask(2, decoder="light")
    assert light.features == DECODER_FEATURES["light"] == 8
    assert isinstance(light.build_head(32, 2, 16, "full"), LightUNETRHead)
    with pytest.raises(ConfigError, match="decoder"):
        SegmentationTask(2, decoder="mystery")


def test_a_config_saved_before_the_folded_decoder_still_means_the_light_one() -> None:
    # What SegmentationTask.to_config wrote before: features 8 and decoder "light", always both.
    old = {
        "num_classes": 2,
        "class_names": ["background", "vessel"],
        "encoding": {"mode": "binary", "colours": []},
        "features": 8,
        "dice_weight": 1.0,
        "skeleton_weight": 0.0,
        "threshold": 0.35,
        "decoder": "light",
    }
    task = SegmentationTask.from_config(old)
    assert task.to_config() == {**old, "soft_targets": False}  # nor were its targets soft
    head = task.build_head(64, 2, 16, "full")
    assert isinstance(head, LightUNETRHead) and head.config["features"] == 8


def test_an_old_light_model_loads_and_predicts_exactly_as_before(tmp_path: Path) -> None:
    torch.manual_seed(0)
    task = SegmentationTask(2, features=4, decoder="light")
    model = TaskModel(tiny_encoder(32), task.build_head(32, 2, 16, "full")).eval()
    encoder = {"timm_name": "vit_tiny_patch16_224", "timm_kwargs": EncoderSpec("nano", 32, 16).timm_kwargs()}
    path = save_task_model(tmp_path / "light.safetensors", model, task, Preprocess(image_size=32), encoder)
    loaded = load_task_model(path)
    assert isinstance(loaded.model.head, LightUNETRHead)
    assert loaded.model.head.config == {"embed_dim": 32, "depth": 2, "num_classes": 2, "features": 4}
    assert loaded.task.decoder == "light" and loaded.task.features == 4  # type: ignore[attr-defined]
    images = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(images), model(images), rtol=0, atol=0)


def test_finetune_cli_takes_the_decoder_at_its_default_width(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISIONFM_STATE_DIR", str(tmp_path / "state"))
    defaults = SegmentationTask.preprocess_defaults
    # Tiny photographs: tiles at their own resolution, no flips (keeps the run to seconds).
    monkeypatch.setattr(SegmentationTask, "preprocess_defaults",
                        lambda self: {**defaults(self), "fov_diameter": 0, "test_flips": False})
    rows = ["image,mask"]
    for number in range(5):
        image, vessels = synthetic_fundus((48, 64), number)
        Image.fromarray(image).save(tmp_path / f"eye{number}.png")
        Image.fromarray((vessels * 255).astype(np.uint8)).save(tmp_path / f"eye{number}_mask.png")
        rows.append(f"eye{number}.png,eye{number}_mask.png")
    (tmp_path / "vessels.csv").write_text("\n".join(rows) + "\n")
    args = ["finetune", str(tmp_path / "vessels.csv"), "--task", "segmentation", "--arch", "nano", "--image-size",
            "32", "--device", "cpu", "--threads", "1", "--epochs", "1", "--min-steps", "1"]
    result = CliRunner().invoke(build_app(), [*args, "--out", str(tmp_path / "l.safetensors"), "--decoder", "light"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    saved = load_task_model(tmp_path / "l.safetensors")
    assert isinstance(saved.model.head, LightUNETRHead) and saved.model.head.config["features"] == 8
    assert saved.task.to_config()["decoder"] == "light"
    result = CliRunner().invoke(build_app(), [*args, "--out", str(tmp_path / "f.safetensors")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    saved = load_task_model(tmp_path / "f.safetensors")
    assert isinstance(saved.model.head, FoldedUNETRHead) and saved.model.head.config["features"] == 32  # default
    assert saved.model.head.config["fuse"] == "reduce" and saved.task.to_config()["decoder"] == "folded-reduce"
    result = CliRunner().invoke(build_app(), [*args, "--out", str(tmp_path / "p.safetensors"), "--decoder", "folded"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    saved = load_task_model(tmp_path / "p.safetensors")
    assert isinstance(saved.model.head, FoldedUNETRHead) and "fuse" not in saved.model.head.config
    manifest = random_label_manifest(tmp_path, 8)
    result = CliRunner().invoke(build_app(), ["finetune", str(manifest), "--out", str(tmp_path / "c.safetensors"),
                                              "--decoder", "light", "--arch", "nano", "--image-size", "32"])
    assert result.exit_code != 0 and "decoder" in result.output and not (tmp_path / "c.safetensors").exists()


@pytest.mark.parametrize("fuse", FUSES)
@pytest.mark.parametrize("num_classes", [2, 5])
def test_every_fusion_gives_logits_at_the_input_size_and_trains_every_weight(fuse: str, num_classes: int) -> None:
    torch.manual_seed(0)
    head = FoldedUNETRHead(32, 2, num_classes, features=8, fuse=fuse)
    logits = head(_features(head, 33, 47))
    assert logits.shape == (2, num_classes, 33, 47)
    logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def _fuse2_convolutions(head: FoldedUNETRHead) -> list[tuple[int, int, int]]:
    """(kernel side, input channels, output channels) of fuse2's convolutions, in order."""
    return [(m.kernel_size[0], m.in_channels, m.out_channels) for m in head.fuse2.modules() if isinstance(m, nn.Conv2d)]


def test_the_reduced_fusions_project_to_the_decoder_width_before_any_3x3() -> None:
    # fuse2 reads the upsampled context, the half-resolution stem and the folded image: 8 + 8 + 12 = 28
    # channels here (76 at the default width), where the plain fusion spends most of the decoder's arithmetic.
    convolutions = {fuse: _fuse2_convolutions(FoldedUNETRHead(32, 2, 2, features=8, fuse=fuse)) for fuse in FUSES}
    assert convolutions["conv"] == [(3, 28, 8), (3, 8, 8)]
    assert convolutions["reduce"] == [(1, 28, 8), (3, 8, 8), (3, 8, 8)]
    assert convolutions["lean"] == [(1, 28, 8), (3, 8, 8)]
    # Everything outside fuse2 is the same decoder, weight for weight.
    heads = {fuse: FoldedUNETRHead(32, 2, 2, features=8, fuse=fuse) for fuse in FUSES}
    outside = {fuse: [(k, tuple(v.shape)) for k, v in head.state_dict().items() if not k.startswith("fuse2.")]
               for fuse, head in heads.items()}
    assert outside["reduce"] == outside["lean"] == outside["conv"]


def test_the_fusion_is_stored_only_when_it_is_not_the_plain_one() -> None:
    # Heads saved before the option had no "fuse" key and meant the plain fusion: they still do.
    assert "fuse" not in FoldedUNETRHead(32, 2, 2, features=8).config
    for fuse in ("reduce", "lean"):
        head = FoldedUNETRHead(32, 2, 2, features=8, fuse=fuse)
        rebuilt = build_head(head.kind, head.config)
        assert isinstance(rebuilt, FoldedUNETRHead) and rebuilt.config == head.config and head.config["fuse"] == fuse
        assert _fuse2_convolutions(rebuilt) == _fuse2_convolutions(head)
    with pytest.raises(ConfigError, match="fuse"):
        FoldedUNETRHead(32, 2, 2, fuse="mystery")


def _save_folded(tmp_path: Path, fuse: str, name: str) -> tuple[Path, TaskModel]:
    torch.manual_seed(0)
    decoder = {"conv": "folded", "reduce": "folded-reduce", "lean": "folded-lean"}[fuse]
    task = SegmentationTask(2, features=8, decoder=decoder)
    model = TaskModel(tiny_encoder(32), task.build_head(32, 2, 16, "full")).eval()
    encoder = {"timm_name": "vit_tiny_patch16_224", "timm_kwargs": EncoderSpec("nano", 32, 16).timm_kwargs()}
    return save_task_model(tmp_path / name, model, task, Preprocess(image_size=32), encoder), model


@pytest.mark.parametrize("fuse", FUSES)
def test_a_folded_model_loads_and_predicts_exactly_as_saved(tmp_path: Path, fuse: str) -> None:
    # "conv" is what every folded model saved before the option holds: its head config has no "fuse".
    path, model = _save_folded(tmp_path, fuse, "m.safetensors")
    loaded = load_task_model(path)
    assert isinstance(loaded.model.head, FoldedUNETRHead)
    assert loaded.model.head.config.get("fuse", "conv") == fuse
    assert _fuse2_convolutions(loaded.model.head) == _fuse2_convolutions(model.head)  # type: ignore[arg-type]
    images = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(images), model(images), rtol=0, atol=0)


def test_weights_that_do_not_fit_the_stored_fusion_fail_naming_the_keys(tmp_path: Path) -> None:
    # A reduced model whose metadata says plain fusion (as code that does not know the option would write
    # it): loading must name fuse2's keys, not fail somewhere later or load half the weights.
    torch.manual_seed(0)
    task = SegmentationTask(2, features=8, decoder="folded-reduce")
    model = TaskModel(tiny_encoder(32), task.build_head(32, 2, 16, "full")).eval()
    model.head.config = {k: v for k, v in model.head.config.items() if k != "fuse"}
    encoder = {"timm_name": "vit_tiny_patch16_224", "timm_kwargs": EncoderSpec("nano", 32, 16).timm_kwargs()}
    path = save_task_model(tmp_path / "odd.safetensors", model, task, Preprocess(image_size=32), encoder)
    named = r"missing head\.fuse2\.1\.bias.*unexpected head\.fuse2\.1\.0\.weight.*wrong shape head\.fuse2\.0\.weight"
    with pytest.raises(CheckpointError, match=named):
        load_task_model(path)
