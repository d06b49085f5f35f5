"""Site-level DP: clipping, calibrated noise, adaptive clipping and the accountant."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.central_dp import (
    AdaptiveClipNorm,
    SiteLevelAccountant,
    add_noise_to_means,
    clip_site_update,
    noise_std_of_mean,
    private_mean_by_modality,
    update_noise_multiplier,
)
from strategies.deltas import l2_norm
from strategies.secagg import SecAggParams
from visionfm_core.errors import ConfigError

from .secagg_driver import run_protocol


def test_clipping_bounds_the_joint_norm_over_all_modalities():
    site_delta = {"fundus/a": np.full(16, 1.0, np.float32), "oct/b": np.full(9, -1.0, np.float32)}
    clipped = clip_site_update(site_delta, clip_norm=2.0)
    assert clipped.norm == pytest.approx(5.0) and not clipped.unclipped
    assert l2_norm(clipped.arrays) == pytest.approx(2.0, rel=1e-6)
    assert np.allclose(clipped.arrays["fundus/a"], 0.4) and np.allclose(clipped.arrays["oct/b"], -0.4)
    small = clip_site_update(site_delta, clip_norm=10.0)
    assert small.unclipped and np.array_equal(small.arrays["oct/b"], site_delta["oct/b"])
    with pytest.raises(ConfigError, match="clip_norm"):
        clip_site_update(site_delta, 0.0)


def test_without_noise_the_private_mean_is_the_unweighted_mean_per_modality():
    sites = [
        {"fundus/a": np.full(4, 1.0, np.float32), "oct/b": np.full(2, 3.0, np.float32)},
        {"fundus/a": np.full(4, 2.0, np.float32)},
        {"fundus/a": np.full(4, 6.0, np.float32)},
    ]
    mean = private_mean_by_modality(sites, noise_multiplier=0.0, clip_norm=1.0, rng=np.random.default_rng(0))
    assert np.allclose(mean["fundus/a"], 3.0) and np.allclose(mean["oct/b"], 3.0)


def test_noise_std_is_z_times_clip_over_the_modality_site_count():
    size = 40_000
    sites = [{"fundus/a": np.zeros(size, np.float32)} for _ in range(4)]
    sites[0]["oct/b"] = np.zeros(size, np.float32)
    noised = private_mean_by_modality(sites, noise_multiplier=1.5, clip_norm=0.2, rng=np.random.default_rng(1))
    assert np.std(noised["fundus/a"]) == pytest.approx(1.5 * 0.2 / 4, rel=0.03)
    assert np.std(noised["oct/b"]) == pytest.approx(1.5 * 0.2 / 1, rel=0.03)
    assert abs(float(np.mean(noised["fundus/a"]))) < 5 * 0.075 / np.sqrt(size)


def test_noise_for_secure_means_uses_the_announced_site_counts():
    means = {"fundus/a": np.full(30_000, 0.5, np.float32)}
    noised = add_noise_to_means(means, {"fundus": 3}, 2.0, 0.3, np.random.default_rng(2))
    assert np.std(noised["fundus/a"] - 0.5) == pytest.approx(noise_std_of_mean(2.0, 0.3, 3), rel=0.03)
    with pytest.raises(KeyError, match="fundus"):
        add_noise_to_means(means, {"oct": 3}, 1.0, 1.0, np.random.default_rng(0))


def test_by_default_the_server_noise_comes_from_the_csprng_not_numpy_seeds():
    means = {"fundus/a": np.zeros(30_000, np.float32)}
    np.random.seed(0)
    first = add_noise_to_means(means, {"fundus": 2}, 1.0, 0.4)["fundus/a"]
    np.random.seed(0)
    second = add_noise_to_means(means, {"fundus": 2}, 1.0, 0.4)["fundus/a"]
    assert first.dtype == np.float32 and not np.array_equal(first, second)
    for noise in (first, second):
        assert np.std(noise) == pytest.approx(noise_std_of_mean(1.0, 0.4, 2), rel=0.03)
    # The adaptive clip norm's count noise takes the same default.
    noisy = [AdaptiveClipNorm(clip_norm=1.0, count_noise_std=0.5).update(3, 4) for _ in range(2)]
    exact = [AdaptiveClipNorm(clip_norm=1.0).update(3, 4) for _ in range(2)]
    assert noisy[0] != noisy[1] and exact[0] == exact[1]


def test_update_noise_multiplier_keeps_the_total_rdp_of_the_nominal_one():
    z, sigma_b = 1.1, 0.6
    z_update = update_noise_multiplier(z, sigma_b)
    assert z_update > z
    # Gaussian RDP is alpha / (2 * noise^2) per unit sensitivity; the tally has sensitivity 1/2.
    assert z_update**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2)
    with pytest.raises(ConfigError, match="count_noise_std"):
        update_noise_multiplier(1.0, 0.5)


def test_adaptive_clip_norm_converges_to_the_target_quantile():
    norms = np.linspace(1.0, 3.0, 11)  # median 2.0
    adaptive = AdaptiveClipNorm(clip_norm=20.0, target_quantile=0.5, learning_rate=0.2)
    rng = np.random.default_rng(3)
    for _ in range(200):
        adaptive.update(int(np.sum(norms <= adaptive.clip_norm)), len(norms), rng)
    assert 1.75 < adaptive.clip_norm < 2.25
    low = AdaptiveClipNorm(clip_norm=0.01, target_quantile=0.9, learning_rate=0.2)
    for _ in range(300):
        low.update(int(np.sum(norms <= low.clip_norm)), len(norms), rng)
    assert 2.5 < low.clip_norm < 3.3
    with pytest.raises(ValueError):
        adaptive.update(12, 11, rng)


def test_accountant_spends_more_with_rounds_and_less_with_noise():
    accountant = SiteLevelAccountant(noise_multiplier=1.0, sample_rate=1.0)
    assert accountant.epsilon(1e-5) == 0.0
    accountant.step()
    one = accountant.epsilon(1e-5)
    accountant.step(9)
    ten = accountant.epsilon(1e-5)
    assert 0 < one < ten and accountant.rounds == 10
    # Never looser than the classic RDP conversion eps <= T*alpha/(2 z^2) + log(1/delta)/(alpha - 1).
    classic = min(10 * a / 2 + np.log(1e5) / (a - 1) for a in np.linspace(1.01, 60, 5000))
    assert ten <= classic
    quieter = SiteLevelAccountant(noise_multiplier=3.0, sample_rate=1.0)
    quieter.step(10)
    assert quieter.epsilon(1e-5) < ten
    sampled = SiteLevelAccountant(noise_multiplier=1.0, sample_rate=0.1)
    sampled.step(10)
    assert sampled.epsilon(1e-5) < ten


def test_rounds_within_a_budget_is_tight():
    accountant = SiteLevelAccountant(noise_multiplier=1.2, sample_rate=0.5)
    rounds = accountant.rounds_within(epsilon=4.0, delta=1e-5)
    accountant.step(rounds)
    assert accountant.epsilon(1e-5) <= 4.0
    accountant.step()
    assert accountant.epsilon(1e-5) > 4.0
    with pytest.raises(ConfigError):
        SiteLevelAccountant(noise_multiplier=0.0)


def test_site_level_dp_runs_on_top_of_secure_aggregation():
    rng = np.random.default_rng(4)
    nodes = [1, 2, 3, 4]
    deltas = {n: {"fundus/w": rng.normal(0, 0.5 * n, 200).astype(np.float32)} for n in nodes}
    clip_norm = 10.0
    # Sites clip locally; equal weights (1 each); the clipping tally rides inside the secure sum.
    clipped = {n: clip_site_update(deltas[n], clip_norm) for n in nodes}
    # A clipped delta never has a coordinate beyond clip_norm, so secagg's value clipping never bites.
    params = SecAggParams(clip_range=clip_norm, max_weight=1, tally_names=("unclipped",))
    run = run_protocol(
        {n: clipped[n].arrays for n in nodes},
        dict.fromkeys(nodes, 1),
        params,
        tallies={n: {"unclipped": int(clipped[n].unclipped)} for n in nodes},
    )
    result = run.result
    expected = np.mean([clipped[n].arrays["fundus/w"] for n in nodes], axis=0)
    step = 2 * clip_norm / (params.levels - 1)
    assert np.abs(result.mean["fundus/w"] - expected).max() <= 1.5 * step
    assert result.tallies["unclipped"] == sum(c.unclipped for c in clipped.values())
    assert result.clipped_values == 0 and result.total_weight == 4
    noised = add_noise_to_means(result.mean, {"fundus": result.total_weight}, 1.0, clip_norm, rng)
    assert not np.allclose(noised["fundus/w"], result.mean["fundus/w"])
    adaptive = AdaptiveClipNorm(clip_norm, count_noise_std=0.2)
    assert adaptive.update(result.tallies["unclipped"], result.total_weight, rng) != clip_norm
