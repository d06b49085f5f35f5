"""DPSSLTrainer on real fundus crops with a tiny ViT: per-image gradients, independence between images,
equality with SSLTrainer when noise and clipping are off, accounting, budget refusal, state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from client.privacy.accountant import (
    PrivacyBudget,
    PrivacyBudgetExceeded,
    SiteAccountant,
    combined_noise_multiplier,
)
from client.privacy.dp_ssl import DPSSLTrainer
from client.privacy.dp_step import per_sample_gradients
from client.privacy.reporting import releasable_metrics
from client.privacy.sampling import PoissonLoader, ssl_poisson_loader
from strategies.protocol.dp_config import DPConfig
from visionfm_core.data.items import ImageItem
from visionfm_core.data.transforms import collate_multicrop, multicrop_transform
from visionfm_core.errors import ConfigError
from visionfm_core.modalities import get_modality
from visionfm_core.models.encoders import EncoderSpec
from visionfm_core.ssl.config import SSLConfig
from visionfm_core.ssl.schedules import schedule_at
from visionfm_core.ssl.trainer import SSLTrainer

SPEC = EncoderSpec("nano", image_size=32, patch_size=8)
FUNDUS = get_modality("fundus")
Views = list[Tensor]


def tiny_cfg(**changes: object) -> SSLConfig:
    base = SSLConfig(
        out_dim=48,
        head_hidden_dim=32,
        head_bottleneck_dim=16,
        local_crops=2,
        local_crop_size=16,
        batch_size=6,
        amp=False,
        mask_prob=1.0,
        freeze_last_layer_fraction=0.0,
    )
    return base.replace(**changes)


def dp_trainer(
    cfg: SSLConfig, dp: DPConfig | None = None, budget: PrivacyBudget | None = None, total_steps: int = 10
) -> DPSSLTrainer:
    accountant = SiteAccountant(budget or PrivacyBudget(math.inf, 1e-3))
    return DPSSLTrainer(
        SPEC, FUNDUS, cfg, total_steps, dp or DPConfig(expected_batch_size=6), accountant, noise_seed=0
    )


@pytest.fixture(scope="module")
def views(fundus_items: list[ImageItem]) -> Views:
    """One multi-crop batch of 6 real images: 2 global 32 px views, 2 local 16 px views."""
    transform = multicrop_transform(FUNDUS, tiny_cfg(), SPEC.image_size, SPEC.patch_size)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        stacked, _ = collate_multicrop([(transform(it.load()), 0) for it in fundus_items[:6]])
    return stacked


def _masks(trainer: DPSSLTrainer, views: Views) -> Tensor:
    masks = trainer._draw_masks(views[0], np.random.default_rng(0))
    masks[:, 2] = False  # one image without any masked patch, as iBOT has half the time
    assert masks[:, 0].any()
    return masks


def _assert_close_to_scale(actual: Tensor, expected: Tensor, what: str) -> None:
    """Equal up to float32 rounding, measured against the tensor's own largest entry."""
    scale = float(expected.abs().max()) + 1e-12
    assert float((actual - expected).abs().max()) <= 1e-4 * scale, what


def _image_gradients(trainer: DPSSLTrainer, views: Views, masks: Tensor | None) -> dict[str, Tensor]:
    schedule = schedule_at(trainer.cfg, 3, trainer.total_steps)
    inputs = trainer.teacher_outputs(views, masks, schedule)
    names = trainer.trainable_names(schedule)
    return per_sample_gradients(trainer.student, trainer.image_loss(schedule), inputs.samples, names).grads


@pytest.mark.parametrize("objective", ["ibot", "dino"])
def test_per_image_gradient_equals_ssltrainer_backward_on_that_image_alone(
    views: Views, objective: str
) -> None:
    trainer = dp_trainer(tiny_cfg(objective=objective))
    trainer.center_cls.normal_(0, 0.1)  # a non-trivial centre from "earlier batches"
    trainer.center_patch.normal_(0, 0.1)
    masks = _masks(trainer, views) if objective == "ibot" else None
    grads = _image_gradients(trainer, views, masks)
    schedule = schedule_at(trainer.cfg, 3, trainer.total_steps)
    for i in range(6):
        # Reference: SSLTrainer's own batched forward on a batch holding image i only.
        trainer.student.zero_grad(set_to_none=True)
        single_masks = masks[:, i : i + 1] if masks is not None else None
        trainer._forward([v[i : i + 1] for v in views], single_masks, schedule).loss.backward()
        for name, param in trainer.student.named_parameters():
            expected = param.grad if param.grad is not None else torch.zeros_like(param)
            _assert_close_to_scale(grads[name][i], expected, f"image {i} {name}")
    assert float(grads["backbone.blocks.0.attn.qkv.weight"][0].norm()) > 0


def test_changing_one_image_leaves_every_other_images_gradient_unchanged(views: Views) -> None:
    trainer = dp_trainer(tiny_cfg())
    trainer.center_cls.normal_(0, 0.1)
    masks = _masks(trainer, views)
    before = _image_gradients(trainer, views, masks)
    changed = [v.clone() for v in views]
    for view in changed:
        view[4] = torch.flip(view[4], dims=(-1,)) + 0.5  # image 4 replaced by something else
    after = _image_gradients(trainer, changed, masks)
    name = "backbone.blocks.1.mlp.fc1.weight"
    assert not torch.allclose(before[name][4], after[name][4])
    for key in before:
        for i in (0, 1, 2, 3, 5):
            torch.testing.assert_close(before[key][i], after[key][i], rtol=0, atol=0, msg=f"image {i} {key}")


def _loader_for(size: int, expected: int, fundus_items: list[ImageItem], cfg: SSLConfig) -> PoissonLoader:
    transform = multicrop_transform(FUNDUS, cfg, SPEC.image_size, SPEC.patch_size)
    return ssl_poisson_loader(fundus_items[:size], transform, expected, seed=0)


def test_without_noise_or_clipping_the_update_equals_ssltrainers(
    views: Views, fundus_items: list[ImageItem]
) -> None:
    cfg = tiny_cfg(clip_grad=0.0, weight_decay=0.0, weight_decay_end=0.0, warmup_fraction=0.0)
    plain = SSLTrainer(SPEC, FUNDUS, cfg, total_steps=10)
    private = dp_trainer(
        cfg, DPConfig(noise_multiplier=0.0, max_grad_norm=1e6, expected_batch_size=6, center="fixed")
    )
    private.use_sampling(_loader_for(60, 6, fundus_items, cfg))  # sample rate 0.1, 6 images expected
    for trainer in (plain, private):
        # Plain SGD (lr from the schedule) makes the weight change equal to the gradient itself.
        sgd = torch.optim.SGD([{"params": g["params"]} for g in trainer.optimizer.param_groups], lr=1.0)
        trainer.optimizer = sgd  # type: ignore[assignment]
    start = {k: v.clone() for k, v in plain.student.state_dict().items()}
    plain.train_step(views, step=0)
    private.train_step(views, step=0)
    lr = schedule_at(cfg, 0, 10).lr
    for name, value in plain.student.state_dict().items():
        moved = (value - start[name]).abs().max() / lr
        torch.testing.assert_close(
            private.student.state_dict()[name],
            value,
            rtol=1e-4,
            atol=1e-5 * lr * max(float(moved), 1.0),
            msg=name,
        )
    assert any(not torch.equal(start[k], v) for k, v in private.student.state_dict().items())


def test_a_short_private_run_learns_spends_epsilon_and_keeps_it_across_rounds(
    fundus_items: list[ImageItem],
) -> None:
    cfg = tiny_cfg(mask_prob=0.5)
    dp = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8)
    budget = PrivacyBudget(20.0, 1e-3)
    trainer = dp_trainer(cfg, dp, budget)
    loader = _loader_for(64, 8, fundus_items, cfg)
    before = {k: v.clone() for k, v in trainer.shared_state().items()}
    center = trainer.center_cls.clone()
    metrics = trainer.train_steps(loader, 3, start_step=0)
    assert all(math.isfinite(metrics[k]) for k in ("loss", "loss_cls", "loss_patch", "epsilon"))
    assert 0 < metrics["epsilon"] < 20.0 and metrics["epsilon_budget"] == 20.0 and metrics["delta"] == 1e-3
    assert metrics["sample_rate"] == 8 / 64
    sigma = combined_noise_multiplier(1.0, dp.center_noise_multiplier, dp.center_noise_multiplier)
    assert metrics["noise_multiplier"] == pytest.approx(sigma)
    assert trainer.accountant.history == [(sigma, 0.125, 3)]
    assert any(not torch.equal(before[k], v) for k, v in trainer.shared_state().items())
    assert not torch.equal(center, trainer.center_cls)  # noised centre moved
    assert set(releasable_metrics(metrics)) == {
        "epsilon",
        "delta",
        "epsilon_budget",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "lr",
        "teacher_temp",
        "teacher_momentum",
    }

    # Next round: a fresh trainer restores the site's state, including what it has spent.
    state = trainer.local_state()
    assert state["privacy.history"].tolist() == [[sigma, 0.125, 3.0]]
    follower = dp_trainer(cfg, dp, budget)
    follower.load_local_state(state)
    follower.load_shared_state(trainer.shared_state(), teacher_sync="keep")
    assert follower.accountant.epsilon_spent() == pytest.approx(metrics["epsilon"])
    second = follower.train_steps(loader, 2, start_step=3)
    assert second["epsilon"] > metrics["epsilon"]
    assert follower.accountant.history == [(sigma, 0.125, 5)]


def test_a_round_past_the_budget_is_refused_and_changes_nothing(fundus_items: list[ImageItem]) -> None:
    cfg = tiny_cfg(objective="dino")
    dp = DPConfig(noise_multiplier=1.5, expected_batch_size=16, center="fixed")
    trainer = dp_trainer(cfg, dp, PrivacyBudget(2.0, 1e-3))
    loader = _loader_for(64, 16, fundus_items, cfg)
    allowed = trainer.accountant.remaining_steps(1.5, 0.25)
    assert 0 < allowed < 10
    before = {k: v.clone() for k, v in trainer.shared_state().items()}
    with pytest.raises(PrivacyBudgetExceeded, match=r"epsilon=2, delta=0\.001"):
        trainer.train_steps(loader, allowed + 1, start_step=0)
    assert trainer.accountant.history == []
    assert all(torch.equal(before[k], v) for k, v in trainer.shared_state().items())
    metrics = trainer.train_steps(loader, allowed, start_step=0)
    assert metrics["epsilon"] <= 2.0
    with pytest.raises(PrivacyBudgetExceeded):
        trainer.train_steps(loader, 1, start_step=allowed)


def test_fixed_centre_never_moves_and_is_not_charged(fundus_items: list[ImageItem]) -> None:
    cfg = tiny_cfg(objective="dino")
    trainer = dp_trainer(cfg, DPConfig(noise_multiplier=1.2, expected_batch_size=8, center="fixed"))
    trainer.train_steps(_loader_for(64, 8, fundus_items, cfg), 2, start_step=0)
    assert torch.count_nonzero(trainer.center_cls) == 0
    assert trainer.accountant.history == [(1.2, 0.125, 2)]


def test_a_shuffled_loader_or_a_large_delta_is_refused(views: Views, fundus_items: list[ImageItem]) -> None:
    cfg = tiny_cfg()
    trainer = dp_trainer(cfg)
    with pytest.raises(ConfigError, match="Poisson"):
        trainer.train_steps([(views, torch.zeros(6))], 1, start_step=0)
    with pytest.raises(ConfigError, match="loader"):
        trainer.train_step(views, 0)  # no sampling known: nothing to account with
    loose = dp_trainer(cfg, budget=PrivacyBudget(5.0, 0.05))
    with pytest.raises(ConfigError, match=r"privacy\.delta"):
        loose.train_steps(_loader_for(32, 8, fundus_items, cfg), 1, start_step=0)
