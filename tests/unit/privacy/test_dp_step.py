"""dp_step on a tiny timm ViT classifier fed real fundus images: exact per-sample gradients, clipping,
noise, microbatching, and refusal of modules that mix samples."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from client.privacy.dp_step import (
    NoiseSettings,
    clip_and_sum,
    dp_step,
    per_sample_gradients,
)
from client.privacy.noise import noise_generator
from visionfm_core.data.items import ImageItem
from visionfm_core.data.transforms import eval_transform
from visionfm_core.errors import ConfigError
from visionfm_core.modalities import get_modality
from visionfm_core.models.encoders import EncoderSpec, create_encoder


class Classifier(nn.Module):
    def __init__(self, classes: int = 5, batchnorm: bool = False) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.encoder = create_encoder(
                EncoderSpec("nano", image_size=32, patch_size=8, drop_path_rate=0.0)
            )
            norm: nn.Module = nn.BatchNorm1d(32) if batchnorm else nn.Identity()
            self.norm = norm
            self.fc = nn.Linear(32, classes)

    def forward(self, images: Tensor) -> Tensor:
        tokens: Tensor = self.encoder.forward_features(images)  # type: ignore[operator]
        return self.fc(self.norm(tokens[:, 0]))


def _grad(param: Tensor) -> Tensor:
    assert param.grad is not None
    return param.grad.detach()


def sample_loss(model: nn.Module, sample: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    logits = model(sample["image"].unsqueeze(0))
    loss = F.cross_entropy(logits, sample["label"].unsqueeze(0))
    return loss, {"confidence": logits.softmax(-1).max()}


@pytest.fixture(scope="module")
def batch(fundus_items: list[ImageItem]) -> dict[str, Tensor]:
    transform = eval_transform(get_modality("fundus"), 32)
    items = fundus_items[:6]
    return {
        "image": torch.stack([transform(it.load()) for it in items]),
        "label": torch.tensor([int(it.label or 0) for it in items]),
    }


def _loop_gradients(model: nn.Module, batch: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """The reference: one ordinary backward pass per sample."""
    grads = []
    for i in range(len(batch["label"])):
        model.zero_grad(set_to_none=True)
        loss, _ = sample_loss(model, {k: v[i] for k, v in batch.items()})
        loss.backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    return grads


def test_per_sample_gradients_equal_a_loop_of_single_sample_backward_passes(batch: dict[str, Tensor]) -> None:
    model = Classifier().train()
    names = [n for n, _ in model.named_parameters()]
    result = per_sample_gradients(model, sample_loss, batch, names)
    reference = _loop_gradients(model, batch)
    assert set(result.grads) == set(names)
    for i, expected in enumerate(reference):
        for name, value in expected.items():
            # The vectorised and the looped passes sum in different orders: float32 rounding is relative to the
            # largest term summed (gradients of ~10 differ by ~5e-6 on an AMD EPYC), not to each small entry.
            scale = max(1.0, float(value.abs().max()))
            torch.testing.assert_close(result.grads[name][i], value, rtol=1e-4, atol=1e-6 * scale, msg=name)
    losses = torch.stack([sample_loss(model, {k: v[i] for k, v in batch.items()})[0] for i in range(6)])
    torch.testing.assert_close(result.losses, losses.detach(), rtol=1e-5, atol=1e-6)
    assert result.aux["confidence"].shape == (6,)


def test_clip_and_sum_bounds_every_sample_and_zeroes_non_finite_ones() -> None:
    grads = {
        "a": torch.tensor([[3.0, 4.0], [0.3, 0.4], [1.0, 0.0]]),
        "b": torch.tensor([[0.0], [0.0], [float("nan")]]),
    }
    sums, norms, finite = clip_and_sum(grads, torch.tensor([1.0, 1.0, 1.0]), max_grad_norm=1.0)
    torch.testing.assert_close(norms[:2], torch.tensor([5.0, 0.5]))
    assert finite.tolist() == [True, True, False]
    # Sample 0 is scaled to norm 1, sample 1 is untouched, sample 2 (NaN) contributes nothing.
    torch.testing.assert_close(sums["a"], torch.tensor([0.6 + 0.3, 0.8 + 0.4]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums["b"], torch.tensor([0.0]))


def test_without_noise_and_clipping_the_step_is_the_ordinary_mean_gradient(batch: dict[str, Tensor]) -> None:
    model = Classifier().train()
    model.zero_grad()
    logits = model(batch["image"])
    F.cross_entropy(logits, batch["label"]).backward()
    expected = {n: _grad(p).clone() for n, p in model.named_parameters()}
    settings = NoiseSettings(max_grad_norm=1e6, noise_multiplier=0.0, expected_batch_size=6)
    result = dp_step(model, sample_loss, batch, settings, noise_generator("cpu", 0))
    assert result.samples == 6 and result.clipped == 0 and result.nonfinite == 0
    for name, param in model.named_parameters():
        assert param.grad is not None
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_each_sample_moves_the_gradient_by_at_most_the_clip_norm(batch: dict[str, Tensor]) -> None:
    model = Classifier().train()
    settings = NoiseSettings(max_grad_norm=0.05, noise_multiplier=0.0, expected_batch_size=1)
    dp_step(model, sample_loss, batch, settings, noise_generator("cpu", 0))
    full = torch.cat([_grad(p).flatten() for p in model.parameters()])
    # Drop one sample: the summed gradient changes by exactly that sample's clipped gradient (norm <= C).
    dp_step(model, sample_loss, {k: v[1:] for k, v in batch.items()}, settings, noise_generator("cpu", 0))
    without_first = torch.cat([_grad(p).flatten() for p in model.parameters()])
    assert float((full - without_first).norm()) == pytest.approx(0.05, rel=1e-3)


def test_noise_has_the_promised_scale_and_an_empty_draw_is_noise_only() -> None:
    model = Classifier().train()
    settings = NoiseSettings(max_grad_norm=0.5, noise_multiplier=1.5, expected_batch_size=4)
    result = dp_step(model, sample_loss, None, settings, noise_generator("cpu", 1))
    assert result.samples == 0
    noise = torch.cat([_grad(p).flatten() for p in model.parameters()])
    assert noise.numel() > 10_000
    # std of (N(0, (1.5 * 0.5)^2)) / 4 over ~10k coordinates: within a few percent.
    assert float(noise.std()) == pytest.approx(1.5 * 0.5 / 4, rel=0.05)
    assert abs(float(noise.mean())) < 0.01


def test_microbatching_gives_the_same_step(batch: dict[str, Tensor]) -> None:
    settings = NoiseSettings(max_grad_norm=0.1, noise_multiplier=0.7, expected_batch_size=6)
    whole, split = Classifier().train(), Classifier().train()
    a = dp_step(whole, sample_loss, batch, settings, noise_generator("cpu", 3))
    b = dp_step(split, sample_loss, batch, settings, noise_generator("cpu", 3), microbatch_size=4)
    assert a.loss_sum == pytest.approx(b.loss_sum, rel=1e-5) and a.clipped == b.clipped
    for (name, p), q in zip(whole.named_parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_only_the_named_parameters_train(batch: dict[str, Tensor]) -> None:
    model = Classifier().train()
    settings = NoiseSettings(max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=6)
    dp_step(
        model, sample_loss, batch, settings, noise_generator("cpu", 0), trainable=["fc.weight", "fc.bias"]
    )
    assert model.fc.weight.grad is not None and model.fc.bias.grad is not None
    assert all(p.grad is None for p in model.encoder.parameters())
    with pytest.raises(ConfigError, match="trainable"):
        dp_step(model, sample_loss, batch, settings, noise_generator("cpu", 0), trainable=["nope"])


def test_batchnorm_in_training_mode_is_refused_by_name(batch: dict[str, Tensor]) -> None:
    model = Classifier(batchnorm=True).train()
    settings = NoiseSettings(max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=6)
    with pytest.raises(ConfigError, match="BatchNorm 'norm'"):
        dp_step(model, sample_loss, batch, settings, noise_generator("cpu", 0))
    model.norm.train(False)  # frozen statistics act per sample: allowed
    dp_step(model, sample_loss, batch, settings, noise_generator("cpu", 0))
    assert model.norm.weight.grad is not None


def test_attention_switch_is_restored_after_the_step(batch: dict[str, Tensor]) -> None:
    model = Classifier().train()
    before = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    settings = NoiseSettings(max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=6)
    dp_step(model, sample_loss, batch, settings, noise_generator("cpu", 0))
    assert [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")] == before
