"""SSLTrainer on real RetinaMNIST crops with a tiny ViT: state split, determinism, sync modes, learning."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import simulations
from visionfm_core.data.sources import load_npz_split
from visionfm_core.data.transforms import collate_multicrop, multicrop_transform
from visionfm_core.errors import CheckpointError, ConfigError, DataError
from visionfm_core.modalities import get_modality
from visionfm_core.models.encoders import EncoderSpec, create_encoder
from visionfm_core.runtime import cpu_supports_bf16
from visionfm_core.ssl.config import SSLConfig
from visionfm_core.ssl.optim import build_optimizer, clip_gradients_
from visionfm_core.ssl.trainer import SSLTrainer

SPEC = EncoderSpec("micro", image_size=32, patch_size=8)
FUNDUS = get_modality("fundus")
Batch = tuple[list[torch.Tensor], torch.Tensor]


def tiny_cfg(**changes: object) -> SSLConfig:
    base = SSLConfig(out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, local_crops=2,
                     local_crop_size=16, batch_size=8)
    return base.replace(**changes)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # The test machine's 2 cores are shared: one thread avoids OpenMP spinning against other processes.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def batches() -> list[Batch]:
    """Four fixed multi-crop batches of 8 real fundus images (28 px, upsampled by the crops to 32)."""
    npz = Path(simulations.__file__).parent / "data" / "retinamnist" / "retinamnist.npz"
    items = load_npz_split(npz, "train").items[:32]
    transform = multicrop_transform(FUNDUS, tiny_cfg(), SPEC.image_size, SPEC.patch_size)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return [collate_multicrop([(transform(it.load()), it.label or 0) for it in items[i:i + 8]])
                for i in range(0, 32, 8)]


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_shared_state_loads_into_a_plain_timm_encoder_strictly() -> None:
    trainer = SSLTrainer(SPEC, FUNDUS, tiny_cfg(objective="ibot"), total_steps=10)
    shared = trainer.shared_state()
    backbone = {k.removeprefix("backbone."): v for k, v in shared.items() if k.startswith("backbone.")}
    encoder = create_encoder(SPEC)
    encoder.load_state_dict(backbone, strict=True)
    assert set(shared) == {f"backbone.{k}" for k in encoder.state_dict()} | {
        f"head.{k}" for k in trainer.student.head.state_dict()}
    assert all(v.device.type == "cpu" and not v.requires_grad for v in shared.values())
    assert not any("mask" in k for k in shared)  # iBOT's mask token stays out of the shared weights
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), trainer.backbone(images), rtol=1e-5, atol=1e-5)


def test_shared_state_without_head_and_copies_are_detached_from_training(batches: list[Batch]) -> None:
    trainer = SSLTrainer(SPEC, FUNDUS, tiny_cfg(share_head=False), total_steps=10)
    shared = trainer.shared_state()
    assert shared and all(k.startswith("backbone.") for k in shared)
    before = {k: v.clone() for k, v in shared.items()}
    trainer.train_steps(batches, 2, 0)
    assert all(torch.equal(before[k], shared[k]) for k in shared)
    assert any("student.head." in k for k in trainer.local_state())


def test_same_seed_gives_identical_losses_and_another_seed_does_not(batches: list[Batch]) -> None:
    cfg = tiny_cfg(objective="ibot")
    spec = EncoderSpec("micro", image_size=32, patch_size=8, drop_path_rate=0.2)  # drop-path draws too
    runs = [SSLTrainer(spec, FUNDUS, cfg, total_steps=6, seed=s) for s in (3, 3, 4)]
    losses = [[t.train_steps(batches, 1, step)["loss"] for step in range(3)] for t in runs]
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


@pytest.mark.parametrize("objective", ["dino", "ibot"])
def test_local_state_round_trip_gives_the_same_next_step(batches: list[Batch], objective: str) -> None:
    cfg = tiny_cfg(objective=objective)
    original = SSLTrainer(SPEC, FUNDUS, cfg, total_steps=10, seed=5)
    original.train_steps(batches, 3, 0)
    shared, local = original.shared_state(), original.local_state()
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in local.values())
    assert not any(k.startswith("backbone.") for k in local)

    restored = SSLTrainer(SPEC, FUNDUS, cfg, total_steps=10, seed=5)
    fresh = SSLTrainer(SPEC, FUNDUS, cfg, total_steps=10, seed=5)
    restored.load_local_state(local)
    restored.load_shared_state(shared, teacher_sync="keep")
    assert restored.step == 3

    expected = original.train_steps(batches[3:], 1, 3)["loss"]
    assert restored.train_steps(batches[3:], 1, 3)["loss"] == expected
    assert fresh.train_steps(batches[3:], 1, 3)["loss"] != expected
    for key, value in original.shared_state().items():
        assert torch.equal(value, restored.shared_state()[key]), key


def test_teacher_sync_reset_ema_and_keep(batches: list[Batch]) -> None:
    cfg = tiny_cfg(objective="dino")
    site = SSLTrainer(SPEC, FUNDUS, cfg, total_steps=10, seed=0)
    site.train_steps(batches, 3, 0)
    global_model = SSLTrainer(SPEC, FUNDUS, cfg, total_steps=10, seed=9)
    global_model.train_steps(batches, 1, 0)
    incoming = global_model.shared_state()
    saved = site.local_state()

    def teacher_backbone(trainer: SSLTrainer) -> dict[str, torch.Tensor]:
        return _params(trainer.teacher.backbone)

    old_teacher = teacher_backbone(site)
    site.load_shared_state(incoming, teacher_sync="ema", teacher_ema=0.75)
    for key, value in teacher_backbone(site).items():
        torch.testing.assert_close(value, 0.75 * old_teacher[key] + 0.25 * incoming[f"backbone.{key}"])
    for key, value in _params(site.student.backbone).items():
        assert torch.equal(value, incoming[f"backbone.{key}"])

    site.load_local_state(saved)
    site.load_shared_state(incoming, teacher_sync="keep")
    assert all(torch.equal(v, old_teacher[k]) for k, v in teacher_backbone(site).items())

    site.load_shared_state(incoming, teacher_sync="reset")
    assert all(torch.equal(v, incoming[f"backbone.{k}"]) for k, v in teacher_backbone(site).items())
    assert all(torch.equal(v, incoming[f"head.{k}"]) for k, v in _params(site.teacher.head).items())


def test_ema_sync_of_a_never_trained_teacher_is_a_reset() -> None:
    incoming = SSLTrainer(SPEC, FUNDUS, tiny_cfg(), total_steps=10, seed=1).shared_state()
    newcomer = SSLTrainer(SPEC, FUNDUS, tiny_cfg(), total_steps=10, seed=2)
    newcomer.load_shared_state(incoming, teacher_sync="ema", teacher_ema=0.5)
    teacher = _params(newcomer.teacher.backbone)
    assert all(torch.equal(v, incoming[f"backbone.{k}"]) for k, v in teacher.items())


def test_missing_head_keys_keep_the_local_head() -> None:
    trainer = SSLTrainer(SPEC, FUNDUS, tiny_cfg(), total_steps=10, seed=0)
    local_head = _params(trainer.student.head)
    other = SSLTrainer(SPEC, FUNDUS, tiny_cfg(), total_steps=10, seed=1).shared_state()
    trainer.load_shared_state({k: v for k, v in other.items() if k.startswith("backbone.")})
    assert all(torch.equal(v, local_head[k]) for k, v in _params(trainer.student.head).items())


def test_bad_shared_or_local_state_names_the_key() -> None:
    trainer = SSLTrainer(SPEC, FUNDUS, tiny_cfg(), total_steps=10)
    shared = trainer.shared_state()
    with pytest.raises(CheckpointError, match=r"teacher\.pos_embed"):
        trainer.load_shared_state({**shared, "teacher.pos_embed": shared["backbone.pos_embed"]})
    with pytest.raises(CheckpointError, match=r"backbone\.pos_embed"):
        trainer.load_shared_state({**shared, "backbone.pos_embed": torch.zeros(1, 5, 64)})
    with pytest.raises(CheckpointError, match=r"backbone\.norm\.weight"):
        trainer.load_shared_state({k: v for k, v in shared.items() if k != "backbone.norm.weight"})
    with pytest.raises(ConfigError, match="teacher_sync"):
        trainer.load_shared_state(shared, teacher_sync="average")
    with pytest.raises(CheckpointError, match=r"center\.cls"):
        trainer.load_local_state({"center.cls": torch.zeros(3)})


@pytest.mark.parametrize("objective", ["dino", "ibot"])
def test_short_training_on_retinamnist_lowers_the_loss_and_changes_weights(
        batches: list[Batch], objective: str) -> None:
    trainer = SSLTrainer(SPEC, FUNDUS, tiny_cfg(objective=objective), total_steps=40, seed=0)
    student_before, teacher_before = _params(trainer.student), _params(trainer.teacher)
    losses = [trainer.train_steps(batches, 1, step)["loss"] for step in range(40)]
    assert np.mean(losses[-10:]) < 0.95 * np.mean(losses[:5])
    assert any(not torch.equal(v, student_before[k]) for k, v in _params(trainer.student).items())
    assert any(not torch.equal(v, teacher_before[k]) for k, v in _params(trainer.teacher).items())
    assert trainer.center_cls.abs().sum() > 0
    if objective == "ibot":
        assert trainer.center_patch.abs().sum() > 0


def test_train_steps_reports_finite_means_and_cycles_a_short_loader(batches: list[Batch]) -> None:
    trainer = SSLTrainer(SPEC, FUNDUS, tiny_cfg(objective="ibot"), total_steps=10)
    metrics = trainer.train_steps(batches[:1], 3, 2)
    assert set(metrics) == {"loss", "loss_cls", "loss_patch", "lr", "teacher_temp", "teacher_momentum",
                            "images", "images_per_s"}
    assert all(np.isfinite(v) for v in metrics.values())
    assert metrics["images"] == 3 * 8
    assert metrics["loss"] == pytest.approx(metrics["loss_cls"] + metrics["loss_patch"], rel=1e-5)
    assert trainer.step == 5
    dino = SSLTrainer(SPEC, FUNDUS, tiny_cfg(objective="dino"), total_steps=10).train_steps(batches, 1, 0)
    assert dino["loss_patch"] == 0.0


def test_wrong_view_count_and_empty_loader_are_clear_errors(batches: list[Batch]) -> None:
    trainer = SSLTrainer(SPEC, FUNDUS, tiny_cfg(), total_steps=10)
    views, labels = batches[0]
    with pytest.raises(ConfigError, match="local_crops"):
        trainer.train_steps([(views[:3], labels)], 1, 0)
    with pytest.raises(DataError, match="no batch"):
        trainer.train_steps([], 1, 0)


def test_frozen_last_layer_does_not_move_while_the_rest_learns(batches: list[Batch]) -> None:
    trainer = SSLTrainer(SPEC, FUNDUS, tiny_cfg(freeze_last_layer_fraction=1.0), total_steps=10)
    params = dict(trainer.student.named_parameters())
    last = params["head.last_layer.weight"].detach().clone()
    qkv = params["backbone.blocks.0.attn.qkv.weight"].detach().clone()
    trainer.train_steps(batches, 2, 0)
    assert torch.equal(params["head.last_layer.weight"], last)
    assert not torch.equal(params["backbone.blocks.0.attn.qkv.weight"], qkv)


def test_teacher_follows_the_student_by_the_scheduled_momentum(batches: list[Batch]) -> None:
    cfg = tiny_cfg(teacher_momentum=0.9)
    trainer = SSLTrainer(SPEC, FUNDUS, cfg, total_steps=1000)
    trainer.train_steps(batches, 1, 0)  # teacher and student now differ
    teacher_before = _params(trainer.teacher.backbone)
    metrics = trainer.train_steps(batches, 1, 1)
    momentum = metrics["teacher_momentum"]
    assert 0.9 < momentum < 0.91
    student = trainer.student.backbone.state_dict()
    for key, value in _params(trainer.teacher.backbone).items():
        expected = momentum * teacher_before[key] + (1 - momentum) * student[key]
        torch.testing.assert_close(value, expected)


def test_masked_patches_hide_their_pixels_from_the_student() -> None:
    trainer = SSLTrainer(SPEC, FUNDUS, tiny_cfg(objective="ibot"), total_steps=10)
    student = trainer.student.eval()
    images = torch.randn(1, 3, 32, 32)
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, 1, 2] = True
    changed = images.clone()
    changed[:, :, 8:16, 16:24] += 5.0  # only inside the masked patch
    with torch.no_grad():
        assert torch.equal(student.encode(images, masks), student.encode(changed, masks))
        assert not torch.equal(student.encode(images), student.encode(changed))
        torch.testing.assert_close(student.encode(images, torch.zeros_like(masks)), student.encode(images))
        # Our patch-embedding matmul and forward path compute exactly what timm's own forward does.
        timm_tokens = student.backbone.forward_features(images)  # type: ignore[operator]
        torch.testing.assert_close(student.encode(images), timm_tokens, rtol=1e-5, atol=1e-5)
        with pytest.raises(ConfigError, match="patch size"):
            student.encode(torch.randn(1, 3, 30, 30))


def test_no_weight_decay_on_biases_norms_and_tokens() -> None:
    trainer = SSLTrainer(SPEC, FUNDUS, tiny_cfg(objective="ibot"), total_steps=10)
    optimizer = build_optimizer(trainer.student, torch.device("cpu"))
    names = {id(p): n for n, p in trainer.student.named_parameters()}
    decayed = {names[id(p)] for p in optimizer.param_groups[0]["params"]}
    plain = {names[id(p)] for p in optimizer.param_groups[1]["params"]}
    assert "backbone.blocks.0.attn.qkv.weight" in decayed and "head.last_layer.weight" in decayed
    assert {"backbone.blocks.0.attn.qkv.bias", "backbone.norm.weight", "backbone.pos_embed",
            "backbone.cls_token", "mask_token"} <= plain
    assert not decayed & plain


def test_gradients_are_clipped_per_tensor() -> None:
    big, small = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    big.grad, small.grad = torch.tensor([6.0, 8.0]), torch.tensor([0.3, 0.0, 0.4])
    norms = clip_gradients_([big, small], max_norm=3.0)
    assert norms.tolist() == pytest.approx([10.0, 0.5])
    assert big.grad.tolist() == pytest.approx([1.8, 2.4], rel=1e-5)
    assert small.grad.tolist() == pytest.approx([0.3, 0.0, 0.4])


def test_mixed_precision_choice_follows_the_config() -> None:
    assert SSLTrainer(SPEC, FUNDUS, tiny_cfg(amp=False), total_steps=1).amp_dtype is None
    amp = SSLTrainer(SPEC, FUNDUS, tiny_cfg(amp=True), total_steps=1).amp_dtype
    # bf16 only where this CPU runs it natively (AMX / avx512_bf16), plain fp32 elsewhere.
    assert amp == (torch.bfloat16 if cpu_supports_bf16() else None)


def test_centres_follow_the_pre_step_teacher_means_of_cls_and_all_patch_logits(batches: list[Batch]) -> None:
    cfg = tiny_cfg(objective="ibot", amp=False, center_momentum=0.75)
    trainer = SSLTrainer(SPEC, FUNDUS, cfg, total_steps=10)
    trainer.train_steps(batches, 1, 0)  # a trained teacher and non-zero centres
    teacher = copy.deepcopy(trainer.teacher)
    cls_before, patch_before = trainer.center_cls.clone(), trainer.center_patch.clone()
    views, _ = batches[1]
    trainer.train_steps([batches[1]], 1, 1)
    with torch.no_grad():
        tokens = teacher.encode(torch.cat(views[:2]))
        cls_mean = teacher.head(tokens[:, 0]).mean(dim=0)
        patch_mean = teacher.head(tokens[:, 1:].flatten(0, 1)).mean(dim=0)
    torch.testing.assert_close(trainer.center_cls, 0.75 * cls_before + 0.25 * cls_mean)
    torch.testing.assert_close(trainer.center_patch, 0.75 * patch_before + 0.25 * patch_mean)
