"""Transport codecs for a dict of float32 arrays: fp16, bf16 (as uint16), int8 with per-tensor scales.

`encode(arrays, codec)` gives the dict of arrays to send and its byte count; `decode(sent, codec)` gives
float32 arrays back. Int8 is symmetric per tensor: the scale travels as a float32 scalar under the key
`<key>` + SCALE_SUFFIX. `ErrorFeedbackEncoder` (kept on the site, one per modality stream) adds the
previous round's rounding residual before encoding, so rounding errors do not accumulate over rounds.
`TrafficMeter` counts bytes sent per site per round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from visionfm_core.errors import ConfigError

CODECS = ("fp32", "fp16", "bf16", "int8")
SCALE_SUFFIX = "#int8_scale"
INT8_LEVEL = 127
FLOAT16_MAX = 65504.0


@dataclass(frozen=True)
class EncodedUpdate:
    """What goes on the wire: the arrays to send, the codec that made them and their payload bytes."""

    arrays: dict[str, np.ndarray]
    codec: str
    nbytes: int


def _check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise ConfigError("compression.codec", f"unknown codec {codec!r}; known: {', '.join(CODECS)}")


def _as_float32(key: str, value: np.ndarray) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype != np.float32:
        raise TypeError(f"array {key!r} is {array.dtype}, codecs take float32")
    return array


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of float32 values, rounded to nearest, ties to even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit rounds to nearest-even before truncating the low half.
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    out = rounded.astype(np.uint16)
    # The rounding add can carry a NaN payload into the sign bit; keep NaNs NaN.
    nan = np.isnan(values)
    if nan.any():
        out[nan] = np.uint16(0x7FC0)
    return out


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns stored as uint16."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def int8_quantise(values: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """Symmetric per-tensor int8: (codes in [-127, 127], scale) with values ~= codes * scale."""
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if peak == 0.0:
        return np.zeros(values.shape, dtype=np.int8), np.float32(0.0)
    scale = np.float32(peak / INT8_LEVEL)
    codes = np.clip(np.rint(values / scale), -INT8_LEVEL, INT8_LEVEL).astype(np.int8)
    return codes, scale


def _encode_one(key: str, value: np.ndarray, codec: str, out: dict[str, np.ndarray]) -> None:
    if codec == "fp32":
        out[key] = value
    elif codec == "fp16":
        # Checked on float32 extremes: numpy's float16 isfinite is slow, and NaN stays NaN anyway.
        if value.size and max(float(value.max()), -float(value.min())) > FLOAT16_MAX:
            raise ValueError(f"array {key!r} exceeds the float16 range (|x| > 65504); use bf16 or int8")
        out[key] = value.astype(np.float16)
    elif codec == "bf16":
        out[key] = float32_to_bf16_bits(value)
    else:
        if not np.isfinite(value).all():
            raise ValueError(f"array {key!r} holds NaN or Inf; int8 cannot encode it")
        codes, scale = int8_quantise(value)
        out[key] = codes
        out[key + SCALE_SUFFIX] = np.asarray(scale, dtype=np.float32)


def encode(arrays: Mapping[str, np.ndarray], codec: str) -> EncodedUpdate:
    """Encode float32 arrays with `codec` ("fp32", "fp16", "bf16" or "int8")."""
    _check_codec(codec)
    out: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        if key.endswith(SCALE_SUFFIX):
            raise ValueError(f"array key {key!r} ends with the reserved suffix {SCALE_SUFFIX!r}")
        _encode_one(key, _as_float32(key, value), codec, out)
    return EncodedUpdate(out, codec, payload_bytes(out))


def decode(sent: Mapping[str, np.ndarray], codec: str) -> dict[str, np.ndarray]:
    """Decode arrays made by `encode(..., codec)` back to float32."""
    _check_codec(codec)
    expected = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16, "int8": np.int8}[codec]
    result: dict[str, np.ndarray] = {}
    for key, value in sent.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        if np.asarray(value).dtype != expected:
            raise TypeError(f"array {key!r} is {np.asarray(value).dtype}, codec {codec} sends {np.dtype(expected)}")
        if codec == "bf16":
            result[key] = bf16_bits_to_float32(value)
        elif codec == "int8":
            if key + SCALE_SUFFIX not in sent:
                raise KeyError(f"int8 array {key!r} arrived without its scale {key + SCALE_SUFFIX!r}")
            scale = np.float32(np.asarray(sent[key + SCALE_SUFFIX]))
            result[key] = value.astype(np.float32) * scale
        else:
            result[key] = np.asarray(value).astype(np.float32)
    return result


def payload_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of array data in `arrays` (what a codec saves; framing overhead is not counted)."""
    return int(sum(np.asarray(value).nbytes for value in arrays.values()))


@dataclass
class ErrorFeedbackEncoder:
    """Site-side encoder that carries each round's rounding error into the next round's update.

    Sent(t) = Q(x(t) + r(t-1)), r(t) = x(t) + r(t-1) - decode(Sent(t)): the sum of what was sent over
    rounds differs from the sum of true updates by only the last residual, which stays bounded by one
    rounding step per coordinate. Use it on deltas; the residual never leaves the site.
    """

    codec: str = "int8"
    residual: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_codec(self.codec)

    def encode(self, arrays: Mapping[str, np.ndarray]) -> EncodedUpdate:
        """Encode `arrays` plus the stored residual, then keep the new residual."""
        corrected = {
            key: _as_float32(key, value) + self.residual[key] if key in self.residual else _as_float32(key, value)
            for key, value in arrays.items()
        }
        encoded = encode(corrected, self.codec)
        decoded = decode(encoded.arrays, self.codec)
        self.residual = {key: corrected[key] - decoded[key] for key in corrected}
        return encoded

    def reset(self) -> None:
        """Drop the residual (e.g. when the global model is replaced by a checkpoint)."""
        self.residual = {}


@dataclass
class TrafficMeter:
    """Bytes sent per site per round, for the run report (site = pseudonymous node id)."""

    sent: dict[int, dict[str, int]] = field(default_factory=dict)

    def record(self, server_round: int, site: str, nbytes: int) -> None:
        """Add `nbytes` sent by `site` in `server_round`."""
        if nbytes < 0:
            raise ValueError(f"negative byte count {nbytes} for site {site}")
        per_site = self.sent.setdefault(server_round, {})
        per_site[site] = per_site.get(site, 0) + nbytes

    def round_total(self, server_round: int) -> int:
        """All bytes sent in one round."""
        return sum(self.sent.get(server_round, {}).values())

    def site_total(self, site: str) -> int:
        """All bytes one site sent over the run."""
        return sum(per_site.get(site, 0) for per_site in self.sent.values())

    def as_rows(self) -> list[dict[str, int | str]]:
        """One row per (round, site), sorted, ready for a CSV or JSON report."""
        return [
            {"round": server_round, "site": site, "bytes": nbytes}
            for server_round in sorted(self.sent)
            for site, nbytes in sorted(self.sent[server_round].items())
        ]
