"""Robust aggregators resist outliers and attackers where the plain weighted mean does not."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.deltas import delta, l2_norm
from strategies.fedavg import SiteReply, weighted_average
from strategies.robust import (
    Update,
    aggregate_per_modality,
    bound_update_norms,
    coordinate_median,
    krum,
    krum_select,
    pairwise_sq_distances,
    trimmed_mean,
)
from visionfm_core.errors import ConfigError

from .model_arrays import random_arrays


def _constant(values: list[float], weight: float = 1.0) -> list[tuple[dict[str, np.ndarray], float]]:
    return [({"m/a": np.full((2, 3), v, np.float32), "m/b": np.full(4, -v, np.float32)}, weight) for v in values]


def test_median_ignores_one_outlier_and_averages_the_middle_pair_for_even_counts():
    result = coordinate_median(_constant([1, 2, 3, 1e6, 4]))
    assert np.all(result["m/a"] == 3) and np.all(result["m/b"] == -3)
    assert result["m/a"].dtype == np.float32
    assert np.all(coordinate_median(_constant([1, 2, 4, 1e6]))["m/a"] == 3)


def test_trimmed_mean_drops_extremes_per_coordinate():
    updates = _constant([1, 2, 3, 4, 1000])
    assert np.allclose(trimmed_mean(updates, 0.2)["m/a"], 3.0)
    assert np.allclose(trimmed_mean(updates, 0.0)["m/a"], 1010 / 5)
    # Per coordinate: a site may be extreme in one coordinate and honest in another.
    mixed = [({"m/a": np.array([v, -v], np.float32)}, 1.0) for v in (1, 2, 3, 4, 1000)]
    assert np.allclose(trimmed_mean(mixed, 0.2)["m/a"], [3, -3])


@pytest.mark.parametrize("beta", [-0.1, 0.5, 0.7])
def test_trimmed_mean_rejects_bad_beta(beta):
    with pytest.raises(ConfigError, match="trim_beta"):
        trimmed_mean(_constant([1, 2, 3]), beta)


def test_pairwise_distances_match_direct_computation(rng):
    updates = [(random_arrays(rng), 1.0) for _ in range(4)]
    distances = pairwise_sq_distances(updates)
    flat = [np.concatenate([a[k].ravel().astype(np.float64) for k in sorted(a)]) for a, _ in updates]
    for i in range(4):
        for j in range(4):
            assert distances[i, j] == pytest.approx(float(np.sum((flat[i] - flat[j]) ** 2)), rel=1e-6, abs=1e-9)


def test_krum_never_selects_the_attacker(rng):
    honest: list[Update] = [(random_arrays(rng, scale=0.01), float(w)) for w in (10, 20, 30, 40)]
    attacker: Update = ({k: v + 5.0 for k, v in random_arrays(rng, scale=0.01).items()}, 1000.0)
    updates = [*honest[:2], attacker, *honest[2:]]
    assert 2 not in krum_select(updates, num_byzantine=1, num_selected=3)
    single = krum(updates, num_byzantine=1)
    assert any(all(np.array_equal(single[k], a[k]) for k in a) for a, _ in honest)
    # Multi-Krum with m = n - f averages exactly the honest sites by weight; the plain mean is dragged away.
    multi = krum(updates, num_byzantine=1, num_selected=4)
    expected = weighted_average(honest)
    assert all(np.allclose(multi[k], expected[k], atol=1e-7) for k in expected)
    plain = weighted_average(updates)
    assert np.abs(plain["fundus/backbone.cls_token"]).min() > 4.0


def test_krum_needs_enough_updates():
    with pytest.raises(ConfigError, match="2f\\+3"):
        krum(_constant([1, 2, 3, 4]), num_byzantine=1)
    with pytest.raises(ConfigError, match="num_selected"):
        krum(_constant([1, 2, 3, 4, 5]), num_byzantine=1, num_selected=5)


def test_norm_bounding_clips_large_deltas_only(rng, global_model):
    big = {k: v + 1.0 for k, v in global_model.items()}
    small = {k: v + 1e-4 for k, v in global_model.items()}
    bounded = bound_update_norms([(big, 3.0), (small, 5.0)], global_model, max_norm=1.0)
    big_delta = delta(bounded[0][0], global_model)
    assert l2_norm(big_delta) == pytest.approx(1.0, rel=1e-5)
    # Same direction: every coordinate of the original delta was 1.0.
    values = np.concatenate([v.ravel() for v in big_delta.values()])
    assert np.allclose(values, values[0], rtol=1e-4)
    assert all(np.allclose(bounded[1][0][k], small[k]) for k in small)
    assert [w for _, w in bounded] == [3.0, 5.0]


def test_aggregate_per_modality_applies_the_aggregator_to_each_holder_set(global_model):
    def site(name: str, shift: float, modalities: tuple[str, ...]) -> SiteReply:
        arrays = {k: v + shift for k, v in global_model.items() if k.split("/")[0] in modalities}
        return SiteReply(name, arrays, {m: 1 for m in modalities})

    replies = [site("a", 0.1, ("fundus", "oct")), site("b", 0.2, ("fundus",)), site("c", 50.0, ("fundus",))]
    result = aggregate_per_modality(replies, coordinate_median, previous=global_model)
    key = "fundus/backbone.cls_token"
    assert np.allclose(result[key], global_model[key] + 0.2)
    # oct came from one site only: its median is that site's update.
    assert np.allclose(result["oct/backbone.cls_token"], global_model["oct/backbone.cls_token"] + 0.1)
    bounded = aggregate_per_modality(
        replies, lambda u: trimmed_mean(u, 0.0), previous=global_model, max_update_norm=0.5
    )
    fundus_delta = delta(
        {k: v for k, v in bounded.items() if k.startswith("fundus/")},
        {k: v for k, v in global_model.items() if k.startswith("fundus/")},
    )
    assert l2_norm(fundus_delta) <= 0.5 + 1e-5


def test_modalities_nobody_sent_keep_the_previous_arrays(global_model):
    reply = SiteReply("a", {k: v + 1 for k, v in global_model.items() if k.startswith("fundus/")}, {"fundus": 3})
    result = aggregate_per_modality([reply], coordinate_median, previous=global_model)
    assert result["oct/backbone.cls_token"] is global_model["oct/backbone.cls_token"]
