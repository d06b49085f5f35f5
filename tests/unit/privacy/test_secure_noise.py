"""DP noise from the CSPRNG: Gaussian moments and shape, independence from torch's and numpy's seeds,
and the switch between the secure and the torch source."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from client.privacy.dp_step import NoiseSettings, dp_step
from client.privacy.noise import SecureNoise, TorchNoise, noise_generator
from strategies.protocol.dp_config import DPConfig
from strategies.secure_noise import SecureGaussian, key_from_seed

DRAWS = 400_000


@pytest.fixture(scope="module")
def draws() -> np.ndarray:
    # A fixed key keeps the statistical checks deterministic; the thresholds are 5-6 standard errors.
    return SecureGaussian(key_from_seed(7)).standard_normal(DRAWS).astype(np.float64)


def test_the_moments_are_those_of_a_standard_normal(draws: np.ndarray) -> None:
    n = draws.size
    assert abs(draws.mean()) < 5 / math.sqrt(n)
    assert abs(draws.var() - 1.0) < 5 * math.sqrt(2 / n)
    assert abs(stats.skew(draws)) < 5 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(draws)) < 5 * math.sqrt(24 / n)  # excess kurtosis 0
    # The whole shape, not just four numbers.
    assert stats.kstest(draws, "norm").pvalue > 1e-4
    # Tail mass beyond 3 sigma: 0.27 % for a Gaussian.
    tail = float(np.mean(np.abs(draws) > 3.0))
    assert abs(tail - 2 * stats.norm.sf(3.0)) < 6 * math.sqrt(2 * stats.norm.sf(3.0) / n)


def test_neighbouring_and_paired_draws_are_uncorrelated(draws: np.ndarray) -> None:
    bound = 5 / math.sqrt(draws.size)
    assert abs(np.corrcoef(draws[:-1], draws[1:])[0, 1]) < bound
    # Box-Muller's cosine and sine halves of one chunk come from the same uniforms.
    chunk = SecureGaussian(key_from_seed(8), chunk_size=DRAWS).standard_normal(DRAWS).astype(np.float64)
    half = DRAWS // 2
    assert abs(np.corrcoef(chunk[:half], chunk[half:])[0, 1]) < 5 / math.sqrt(half)
    assert abs(np.corrcoef(chunk[:half] ** 2, chunk[half:] ** 2)[0, 1]) < 5 / math.sqrt(half)


def test_the_extreme_uniform_gives_a_finite_far_tail() -> None:
    source = SecureGaussian(key_from_seed(0), chunk_size=2)
    # An all-zero keystream is the smallest uniform the generator can draw: u = 2**-54, angle 0.
    source._keystream = lambda count: memoryview(bytes(count))  # type: ignore[method-assign]
    value = float(source.standard_normal(1)[0])
    assert value == pytest.approx(math.sqrt(-2 * math.log(2.0**-54)), rel=1e-6)
    assert value > 8.5  # beyond the 5.8 sigma that 24-bit uniforms reach


def test_a_fresh_source_ignores_torch_and_numpy_seeds() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    first = noise_generator("cpu").gaussian((1000,), torch.device("cpu"))
    after_first = torch.rand(4)
    torch.manual_seed(0)
    np.random.seed(0)
    second = noise_generator("cpu").gaussian((1000,), torch.device("cpu"))
    after_second = torch.rand(4)
    assert not torch.equal(first, second)
    # Drawing secure noise does not consume torch's global stream either.
    assert torch.equal(after_first, after_second)


def test_a_test_key_reproduces_its_stream_in_any_chunking() -> None:
    a = SecureGaussian(key_from_seed(3)).standard_normal(5000)
    b = SecureGaussian(key_from_seed(3)).standard_normal(5000)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, SecureGaussian(key_from_seed(4)).standard_normal(5000))
    with pytest.raises(ValueError, match="16 bytes"):
        SecureGaussian(b"short")


def test_normal_scales_and_shifts_like_numpy() -> None:
    source = SecureGaussian(key_from_seed(5))
    values = source.normal(2.0, 0.5, size=(200, 500))
    assert values.shape == (200, 500) and values.dtype == np.float32
    assert float(values.mean()) == pytest.approx(2.0, abs=5 * 0.5 / math.sqrt(values.size))
    assert float(values.std()) == pytest.approx(0.5, rel=0.01)
    assert isinstance(source.normal(0.0, 1.0), float)
    with pytest.raises(ValueError, match="scale"):
        source.normal(0.0, -1.0, size=3)


def test_the_secure_source_is_the_default_and_can_be_switched_off() -> None:
    assert isinstance(noise_generator("cpu"), SecureNoise)
    assert isinstance(noise_generator("cpu", secure=False), TorchNoise)
    assert DPConfig().secure_noise is True
    assert DPConfig.from_dict({"privacy.secure-noise": "false"}).secure_noise is False
    torch_noise = noise_generator("cpu", seed=1, secure=False)
    assert torch.equal(
        torch_noise.gaussian((10,), torch.device("cpu")),
        torch.randn(10, generator=torch.Generator().manual_seed(1)),
    )


def test_dp_steps_under_the_same_torch_seed_get_different_noise() -> None:
    settings = NoiseSettings(max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=4)

    def noised_gradient() -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Linear(50, 20)
        dp_step(model, lambda m, s: m(s["x"]).sum(), None, settings, noise_generator("cpu"))
        assert model.weight.grad is not None
        return model.weight.grad.clone()

    first, second = noised_gradient(), noised_gradient()
    assert not torch.equal(first, second)
    # Both are noise of the promised scale: std sigma * C / expected batch size.
    assert float(torch.cat([first, second]).std()) == pytest.approx(0.25, rel=0.1)
