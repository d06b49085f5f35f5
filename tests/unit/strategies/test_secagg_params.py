"""SecAgg+ building blocks: parameter rules, the ring graph, mask streams and quantisation."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from strategies.secagg import SecAggAbort, SecAggParams
from strategies.secagg.masking import (
    MaskStream,
    Quantiser,
    apply_masks,
    count_clipped,
    masked_site_vector,
    ranges,
    unmask_and_dequantise,
)
from strategies.secagg.params import ring_neighbourhood
from visionfm_core.errors import ConfigError


def _resolve(params: SecAggParams, n: int):
    return params.resolve("fundus", n, ["fundus/w"], [10])


@pytest.mark.parametrize(
    ("num_shares", "n", "expected"),
    [(1.0, 5, 5), (0.5, 11, 7), (0.2, 30, 7), (3, 9, 3), (4, 9, 5), (20, 6, 6)],
)
def test_num_shares_resolves_to_an_odd_neighbourhood_or_everyone(num_shares, n, expected):
    assert _resolve(SecAggParams(num_shares=num_shares, threshold=0.6), n).num_shares == expected


@pytest.mark.parametrize(
    ("threshold", "shares", "expected"), [(0.6, 5, 3), (0.5, 5, 3), (1.0, 5, 5), (4, 5, 4), (0.6, 2, 2)]
)
def test_threshold_resolves_from_a_fraction_of_the_neighbourhood(threshold, shares, expected):
    assert _resolve(SecAggParams(threshold=threshold), shares).threshold == expected


@pytest.mark.parametrize(
    ("params", "key"),
    [
        (SecAggParams(num_shares=2), "secagg.num_shares"),
        (SecAggParams(threshold=2), "secagg.threshold"),  # 2 of 5 is not more than half
        (SecAggParams(threshold=6), "secagg.threshold"),
        (SecAggParams(levels=1 << 23), "secagg.levels"),
        (SecAggParams(max_weight=1 << 30), "secagg.max_weight"),
        (SecAggParams(clip_range=0.0), "secagg.clip_range"),
        (SecAggParams(tally_names=("a", "a")), "secagg.tally_names"),
    ],
)
def test_bad_parameters_name_their_key(params, key):
    with pytest.raises(ConfigError, match=key):
        _resolve(params, 5)


def test_levels_must_leave_room_for_every_site_in_32_bits():
    params = SecAggParams(levels=1 << 22)
    assert _resolve(params, 1023).levels == 1 << 22
    with pytest.raises(ConfigError, match="1024 sites"):
        _resolve(params, 1024)


def test_a_single_site_cannot_be_summed_securely():
    with pytest.raises(SecAggAbort) as caught:
        _resolve(SecAggParams(), 1)
    assert caught.value.stage == "setup"


def test_ring_neighbourhoods_are_symmetric_and_sized():
    members = [0, 2, 3, 5, 8, 9, 12]
    hoods = {i: ring_neighbourhood(members, i, 5) for i in members}
    assert all(len(h) == 5 and i in h for i, h in hoods.items())
    assert all(i in hoods[j] for i, h in hoods.items() for j in h)
    assert hoods[0] == [0, 2, 3, 9, 12]
    assert ring_neighbourhood(members, 5, 9) == members


def test_mask_streams_are_deterministic_and_independent_of_chunking():
    key = os.urandom(16)
    whole = MaskStream(key, 64).next(40).copy()
    pieces = MaskStream(key, 64)
    joined = np.concatenate([pieces.next(12).copy(), pieces.next(28).copy()])
    assert np.array_equal(whole, joined)
    assert not np.array_equal(whole, MaskStream(os.urandom(16), 64).next(40))


def test_adding_and_subtracting_the_same_stream_wraps_back_exactly():
    key = os.urandom(16)
    vector = np.arange(1000, dtype=np.uint32) * np.uint32(4_000_000)
    original = vector.copy()
    apply_masks(vector, [key], [], 128)
    assert not np.array_equal(vector, original)
    apply_masks(vector, [], [key], 128)
    assert np.array_equal(vector, original)


def test_quantiser_roundtrip_error_and_range():
    config = SecAggParams(levels=1 << 12, clip_range=1.0, chunk_size=1000).resolve("g", 3, ["w"], [1000])
    quantiser = Quantiser(config)
    values = np.linspace(-1.5, 1.5, 1000).astype(np.float32)
    out = np.empty(1000, np.uint32)
    assert count_clipped("w", values, 0.5, config.clip_range) == 0  # 0.5 * 1.5 fits in [-1, 1]
    quantiser.quantise_into(values, 0.5, out)
    assert out.max() <= config.levels
    back = quantiser.dequantise_in_place(out.copy(), num_sites=1, divisor=0.5)
    assert np.abs(back - values).max() <= 1.5 * quantiser.step / 0.5
    assert count_clipped("w", values, 1.0, config.clip_range) == int(np.sum(np.abs(values) > 1))
    quantiser.quantise_into(values, 1.0, out)
    # Clipped values sit on the end levels; float rounding may carry the top one to `levels` itself,
    # which the overflow rule (sites x levels < 2**32) leaves room for.
    assert out.min() == 0 and out.max() in (config.levels - 1, config.levels)


def test_non_finite_values_are_caught_before_quantising():
    with pytest.raises(ValueError, match="'w'"):
        count_clipped("w", np.array([0.0, np.nan], np.float32), 1.0, 1.0)
    with pytest.raises(ValueError, match="'w'"):
        count_clipped("w", np.array([-np.inf, 0.0], np.float32), 1.0, 1.0)


def test_a_stream_can_start_anywhere():
    key = os.urandom(16)
    whole = MaskStream(key, 64).next(40).copy()
    for start in (1, 4, 7, 13):
        assert np.array_equal(MaskStream(key, 64, start).next(40 - start), whole[start:])


def test_ranges_cover_the_vector_on_block_bounds():
    spans = ranges(3, 10_000_003, 4)
    assert spans[0][0] == 3 and spans[-1][1] == 10_000_003 and len(spans) == 4
    assert all(a % 4 == 0 for a, _ in spans[1:]) and all(b == a for (_, b), (a, _) in itertools.pairwise(spans))
    assert ranges(0, 1000, 8) == [(0, 1000)]  # small vectors stay in one thread


def test_threaded_sweeps_give_the_same_words_as_one_thread():
    # Large enough for several ranges; deterministic rounding so both runs can be compared word for word.
    sizes = [1_500_001, 7, 1_200_000]
    config = SecAggParams(stochastic_rounding=False, max_weight=10, tally_names=("t",)).resolve(
        "g", 3, ["a", "b", "c"], sizes
    )
    rng = np.random.default_rng(0)
    values = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in zip("abc", sizes, strict=True)}
    adding, subtracting = [os.urandom(16), os.urandom(16)], [os.urandom(16)]
    one = masked_site_vector(config, values, 0.5, [5, 0, 9], adding, subtracting, workers=1)
    three = masked_site_vector(config, values, 0.5, [5, 0, 9], adding, subtracting, workers=3)
    assert np.array_equal(one, three)
    header, mean = unmask_and_dequantise(config, three, subtracting, adding, num_sites=1, workers=3)
    assert header.tolist() == [5, 0, 9]
    flat = np.concatenate([values[k] for k in "abc"])
    assert np.abs(mean - flat).max() <= Quantiser(config).step / (5 / 10)
