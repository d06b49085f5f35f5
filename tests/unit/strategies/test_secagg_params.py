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
    assert quantiser.quantise_into(values, 0.5, out) == 0  # 0.5 * 1.5 fits in [-1, 1]: nothing clipped
    assert out.max() <= config.levels - 1
    back = quantiser.dequantise_in_place(out.copy(), num_sites=1, divisor=0.5)
    assert np.abs(back - values).max() <= 1.5 * quantiser.step / 0.5
    assert quantiser.quantise_into(values, 1.0, out) == int(np.sum(np.abs(values) > 1))
    # Clipped values sit on the end levels.
    assert out.min() == 0 and out.max() == config.levels - 1
    assert np.all(out[values < -1] == 0) and np.all(out[values > 1] == config.levels - 1)


def test_stochastic_rounding_is_unbiased_and_nearest_rounding_is_exact():
    config = SecAggParams(levels=1 << 10, clip_range=1.0, chunk_size=1 << 16).resolve("g", 3, ["w"], [1 << 16])
    quantiser = Quantiser(config)
    # Every value sits 0.3 of a level above a level: rounding up 30 % of the time is unbiased.
    level = 700
    value = (level + 0.3) * quantiser.step - config.clip_range
    values = np.full(1 << 16, value, np.float32)
    out = np.empty(values.size, np.uint32)
    quantiser.quantise_into(values, 1.0, out)
    assert set(np.unique(out).tolist()) == {level, level + 1}
    ups = float(np.mean(out == level + 1))
    assert abs(ups - 0.3) < 5 * np.sqrt(0.3 * 0.7 / values.size) + 1 / 256
    nearest = Quantiser(
        SecAggParams(levels=1 << 10, clip_range=1.0, chunk_size=1 << 16, stochastic_rounding=False).resolve(
            "g", 3, ["w"], [1 << 16]
        )
    )
    nearest.quantise_into(values, 1.0, out)
    assert np.all(out == level)
    nearest.quantise_into(values + np.float32(0.4 * quantiser.step), 1.0, out)
    assert np.all(out == level + 1)


def test_dequantising_a_sum_of_many_sites_keeps_float32_precision():
    # 900 sites at 2**22 levels: the centred sums exceed 2**24, where float32 stops holding integers.
    sites, size = 900, 4096
    config = SecAggParams(clip_range=1.0, max_weight=10, chunk_size=size).resolve("g", sites, ["w"], [size])
    quantiser = Quantiser(config)
    rng = np.random.default_rng(0)
    levels = rng.integers(0, config.levels, size=(sites, size), dtype=np.int64)
    total = (levels.sum(axis=0) % (1 << 32)).astype(np.uint32)
    exact = (levels.sum(axis=0) * quantiser.step - sites * config.clip_range) / 7.0
    mean = quantiser.dequantise_in_place(total, sites, divisor=7.0)
    assert mean.dtype == np.float32
    # Within a few float32 ulps of the largest value: far below one quantisation step per site.
    assert np.abs(mean - exact).max() <= 4 * np.spacing(np.float32(np.abs(exact).max()))


def test_non_finite_values_are_refused_by_key_while_quantising():
    config = SecAggParams(chunk_size=64).resolve("g", 3, ["a", "w"], [5, 200])
    for bad in (np.nan, -np.inf, np.inf):
        values = {"a": np.zeros(5, np.float32), "w": np.zeros(200, np.float32)}
        values["w"][150] = bad
        for factor in (1.0, 0.0):  # a zero weight must not hide a NaN (0 * Inf is NaN too)
            with pytest.raises(ValueError, match="'w' holds NaN or Inf"):
                masked_site_vector(config, values, factor, 0, [], [os.urandom(16)], [])
    # A huge finite value overflows float32 when scaled: it is clipped and counted, not refused.
    huge = np.full(64, 3e38, np.float32)
    huge[::2] *= -1
    out = np.empty(64, np.uint32)
    assert Quantiser(config).quantise_into(huge, 1.0, out) == 64
    assert np.all(out[1::2] == config.levels - 1) and np.all(out[::2] == 0)


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
    values["a"][:4] = 50.0  # clipped in the first and the last range: counted across the threads
    values["c"][-3:] = -50.0
    one = masked_site_vector(config, values, 0.5, 5, [9], adding, subtracting, workers=1)
    three = masked_site_vector(config, values, 0.5, 5, [9], adding, subtracting, workers=3)
    assert np.array_equal(one, three)
    header, mean = unmask_and_dequantise(config, three, subtracting, adding, num_sites=1, workers=3)
    assert header.tolist() == [5, 7, 9]
    # A clipped value comes back as +-clip_range / factor (here 1 / 0.5).
    values["a"][:4], values["c"][-3:] = 2.0, -2.0
    flat = np.concatenate([values[k] for k in "abc"])
    assert np.abs(mean - flat).max() <= Quantiser(config).step / (5 / 10)
