"""Transport codecs: roundtrip error bounds, byte counts on real ViT shapes, bounded error feedback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from strategies.compression import (
    SCALE_SUFFIX,
    ErrorFeedbackEncoder,
    TrafficMeter,
    bf16_bits_to_float32,
    decode,
    encode,
    float32_to_bf16_bits,
)
from visionfm_core.errors import ConfigError
from visionfm_core.models.encoders import EncoderSpec, create_encoder

from .model_arrays import random_arrays


@pytest.fixture(scope="module")
def vit_tiny_update() -> dict[str, np.ndarray]:
    """A delta shaped like a real ViT-Tiny encoder (5.5 M values), built on the meta device."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in create_encoder(EncoderSpec(arch="tiny")).state_dict().items()}
    rng = np.random.default_rng(7)
    return {f"fundus/{k}": rng.normal(0, 1e-3, size=s).astype(np.float32) for k, s in shapes.items()}


def test_fp32_is_the_identity(rng):
    arrays = random_arrays(rng)
    encoded = encode(arrays, "fp32")
    assert encoded.nbytes == sum(v.nbytes for v in arrays.values())
    assert all(np.array_equal(decode(encoded.arrays, "fp32")[k], v) for k, v in arrays.items())


def test_fp16_roundtrip_is_within_half_an_ulp(rng):
    arrays = random_arrays(rng, scale=3.0)
    decoded = decode(encode(arrays, "fp16").arrays, "fp16")
    for key, value in arrays.items():
        assert decoded[key].dtype == np.float32
        assert np.all(np.abs(decoded[key] - value) <= np.abs(value) * 2.0**-11 + 2.0**-25)


def test_fp16_overflow_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="m/big"):
        encode({"m/big": np.array([1e6], np.float32)}, "fp16")


def test_bf16_bits_match_torch_rounding(rng):
    values = np.concatenate(
        [rng.normal(0, 1, 10_000), rng.normal(0, 1e-30, 100), [0.0, -0.0, 1.0, np.inf, -np.inf, 3.4e38]]
    ).astype(np.float32)
    ours = float32_to_bf16_bits(values)
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)
    assert np.isnan(bf16_bits_to_float32(float32_to_bf16_bits(np.array([np.nan], np.float32))))[0]


def test_bf16_roundtrip_relative_error(rng):
    arrays = random_arrays(rng, scale=10.0)
    encoded = encode(arrays, "bf16")
    assert all(v.dtype == np.uint16 for v in encoded.arrays.values())
    decoded = decode(encoded.arrays, "bf16")
    for key, value in arrays.items():
        assert np.all(np.abs(decoded[key] - value) <= np.abs(value) * 2.0**-8)


def test_int8_roundtrip_is_within_half_a_step(rng):
    arrays = random_arrays(rng)
    encoded = encode(arrays, "int8")
    decoded = decode(encoded.arrays, "int8")
    for key, value in arrays.items():
        scale = float(encoded.arrays[key + SCALE_SUFFIX])
        assert scale == pytest.approx(np.abs(value).max() / 127, rel=1e-6)
        assert np.all(np.abs(decoded[key] - value) <= scale / 2 * (1 + 1e-5))
        assert np.abs(encoded.arrays[key]).max() == 127


def test_int8_zero_tensor_and_bad_input():
    zero = decode(encode({"m/z": np.zeros((3, 3), np.float32)}, "int8").arrays, "int8")
    assert np.array_equal(zero["m/z"], np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="m/x"):
        encode({"m/x": np.array([1.0, np.nan], np.float32)}, "int8")
    with pytest.raises(KeyError, match="scale"):
        decode({"m/x": np.zeros(3, np.int8)}, "int8")
    with pytest.raises(TypeError, match="m/x"):
        decode({"m/x": np.zeros(3, np.float32)}, "fp16")
    with pytest.raises(TypeError, match="float32"):
        encode({"m/x": np.zeros(3, np.float64)}, "bf16")
    with pytest.raises(ConfigError, match="codec"):
        encode({}, "int4")


def test_bytes_on_a_real_vit_tiny_update(vit_tiny_update):
    fp32 = encode(vit_tiny_update, "fp32").nbytes
    assert encode(vit_tiny_update, "fp16").nbytes / fp32 == pytest.approx(0.5)
    assert encode(vit_tiny_update, "bf16").nbytes / fp32 == pytest.approx(0.5)
    int8_ratio = encode(vit_tiny_update, "int8").nbytes / fp32
    assert 0.25 < int8_ratio <= 0.27


def test_error_feedback_keeps_the_accumulated_error_bounded():
    # One large coordinate fixes the int8 scale; the small ones round to zero every round without feedback.
    update = {"m/x": np.array([1.0] + [0.003] * 7, np.float32)}
    rounds = 200
    plain_sent = np.zeros(8, np.float64)
    fed_sent = np.zeros(8, np.float64)
    feedback = ErrorFeedbackEncoder("int8")
    bound = 1.0 / 127 / 2 * (1 + 1e-4)
    for step in range(1, rounds + 1):
        plain_sent += decode(encode(update, "int8").arrays, "int8")["m/x"]
        fed_sent += decode(feedback.encode(update).arrays, "int8")["m/x"]
        truth = step * update["m/x"].astype(np.float64)
        # With feedback the gap is exactly the residual still held on the site, at most half a step.
        assert np.abs(fed_sent - truth).max() <= bound
        assert np.allclose(fed_sent + feedback.residual["m/x"], truth, atol=1e-4)
    assert np.abs(plain_sent - rounds * update["m/x"]).max() == pytest.approx(rounds * 0.003, rel=1e-3)
    feedback.reset()
    assert feedback.residual == {}


def test_traffic_meter_counts_bytes_per_site_per_round(rng):
    meter = TrafficMeter()
    arrays = random_arrays(rng)
    for server_round in (1, 2):
        for site, codec in (("node-1", "fp32"), ("node-2", "int8")):
            meter.record(server_round, site, encode(arrays, codec).nbytes)
    fp32 = sum(v.nbytes for v in arrays.values())
    int8 = sum(v.size for v in arrays.values()) + 4 * len(arrays)
    assert meter.round_total(1) == fp32 + int8
    assert meter.site_total("node-2") == 2 * int8
    assert meter.as_rows()[0] == {"round": 1, "site": "node-1", "bytes": fp32}
    with pytest.raises(ValueError):
        meter.record(3, "node-1", -1)
