"""Protocol parameters, the per-group configuration sent at stage 0, the neighbour graph, and payloads.

A payload is a flat dict whose values fit Flower's records: ints, floats, strings, bytes, bools and
lists of them go in a `ConfigRecord`, numpy arrays in an `ArrayRecord` (`split_payload` does that).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from strategies.secagg.errors import SecAggAbort, SecAggProtocolError
from visionfm_core.errors import ConfigError

PayloadValue = int | float | str | bytes | bool | list[int] | list[str] | list[bytes] | np.ndarray
Payload = dict[str, PayloadValue]

MODULUS = 1 << 32  # masked vectors are uint32: additions wrap around modulo 2**32
MAX_LEVELS = 1 << 22  # float32 quantisation keeps its rounding under 3/8 of a level up to here
NONCE_BYTES = 16
T = TypeVar("T")


@dataclass(frozen=True)
class SecAggParams:
    """What the coordinator chooses once; `resolve` turns it into one group's configuration.

    threshold: shares needed to rebuild a secret, also the fewest sites a stage may continue with;
        an int is absolute, a float a fraction of num_shares (rounded up). Must exceed num_shares/2.
    num_shares: neighbourhood size of the SecAgg+ ring graph (self included); an int (> 2) is
        absolute, a float a fraction of the group; clamped to the group size and made odd.
    clip_range: each weighted value w * x is clipped to [-clip_range, clip_range] before quantising
        (aggregate deltas, not weights, so a small range fits); clipped values are counted.
    levels: quantisation levels over [-clip_range, clip_range], at most 2**22 (then up to 1023 sites).
    max_weight: upper bound of a site's weight (example count); values are scaled by
        weight / max_weight, so keep it close to the largest real count for precision.
    tally_names: extra non-negative integers each site adds to the secure sum (e.g. "unclipped").
    """

    threshold: int | float = 0.6
    num_shares: int | float = 1.0
    clip_range: float = 1.0
    levels: int = 1 << 22
    max_weight: int = 100_000
    tally_names: tuple[str, ...] = ()
    stochastic_rounding: bool = True
    chunk_size: int = 1 << 16

    def resolve(self, group: str, num_clients: int, keys: Sequence[str], sizes: Sequence[int]) -> GroupConfig:
        """The configuration of one group of `num_clients` sites summing arrays `keys` of `sizes`."""
        if num_clients < 2:
            raise SecAggAbort(group, "setup", 2, num_clients, "a secure sum needs at least two sites")
        num_shares = _resolve_num_shares(self.num_shares, num_clients)
        threshold = _resolve_threshold(self.threshold, num_shares)
        _check_ranges(self, num_clients)
        if len(keys) != len(sizes) or not keys:
            raise ConfigError("secagg.layout", "keys and sizes must be non-empty and of equal length")
        return GroupConfig(
            group=group,
            num_clients=num_clients,
            threshold=threshold,
            num_shares=num_shares,
            clip_range=float(self.clip_range),
            levels=int(self.levels),
            max_weight=int(self.max_weight),
            tally_names=tuple(self.tally_names),
            stochastic_rounding=bool(self.stochastic_rounding),
            chunk_size=int(self.chunk_size),
            nonce=os.urandom(NONCE_BYTES),
            keys=tuple(keys),
            sizes=tuple(int(s) for s in sizes),
        )


def _resolve_num_shares(requested: int | float, num_clients: int) -> int:
    if isinstance(requested, bool) or not isinstance(requested, (int, float)):
        raise ConfigError("secagg.num_shares", f"must be an int or a float, got {requested!r}")
    if isinstance(requested, int):
        if requested <= 2:
            raise ConfigError("secagg.num_shares", f"an integer must be > 2, got {requested}")
        shares = requested
    else:
        if not 0.0 < requested <= 1.0:
            raise ConfigError("secagg.num_shares", f"a fraction must lie in (0, 1], got {requested}")
        shares = max(3, round(requested * num_clients))
    if shares >= num_clients:
        return num_clients
    # The ring graph takes the same number of neighbours on each side.
    return min(num_clients, shares | 1)


def _resolve_threshold(requested: int | float, num_shares: int) -> int:
    if isinstance(requested, bool) or not isinstance(requested, (int, float)):
        raise ConfigError("secagg.threshold", f"must be an int or a float, got {requested!r}")
    threshold = requested if isinstance(requested, int) else math.ceil(requested * num_shares)
    # More than half the neighbourhood: no two disjoint sets of sites can each rebuild a secret,
    # so a server cannot learn both masks of one site by telling its neighbours different stories.
    if not num_shares // 2 < threshold <= num_shares or threshold < 2:
        raise ConfigError(
            "secagg.threshold",
            f"resolves to {threshold}; it must exceed num_shares/2 and be in [2, {num_shares}]",
        )
    return threshold


def _check_ranges(params: SecAggParams, num_clients: int) -> None:
    if not params.clip_range > 0:
        raise ConfigError("secagg.clip_range", f"must be positive, got {params.clip_range}")
    if not 2 <= params.levels <= MAX_LEVELS:
        raise ConfigError("secagg.levels", f"must lie in [2, 2**22], got {params.levels}")
    if num_clients * params.levels >= MODULUS:
        raise ConfigError("secagg.levels", f"{num_clients} sites x {params.levels} levels overflow 2**32")
    if params.max_weight < 1 or num_clients * params.max_weight >= MODULUS:
        raise ConfigError("secagg.max_weight", f"must be >= 1 and sum below 2**32, got {params.max_weight}")
    if params.chunk_size < 64:
        raise ConfigError("secagg.chunk_size", f"must be at least 64, got {params.chunk_size}")
    if len(set(params.tally_names)) != len(params.tally_names) or len(params.tally_names) > 32:
        raise ConfigError("secagg.tally_names", "names must be distinct, at most 32")


@dataclass(frozen=True)
class GroupConfig:
    """One group's protocol configuration: identical on the server and every client of the group."""

    group: str
    num_clients: int
    threshold: int
    num_shares: int
    clip_range: float
    levels: int
    max_weight: int
    tally_names: tuple[str, ...]
    stochastic_rounding: bool
    chunk_size: int
    nonce: bytes
    keys: tuple[str, ...]
    sizes: tuple[int, ...]

    @property
    def value_count(self) -> int:
        """Number of model values in the vector."""
        return sum(self.sizes)

    @property
    def vector_length(self) -> int:
        """The weight, the clipped-value count and the tallies, then the model values."""
        return 2 + len(self.tally_names) + self.value_count

    @property
    def weight_cap_per_site(self) -> int:
        """Largest tally a site may add without the group's sum overflowing 2**32."""
        return (MODULUS - 1) // self.num_clients

    def to_payload(self) -> Payload:
        return {
            "group": self.group,
            "num_clients": self.num_clients,
            "threshold": self.threshold,
            "num_shares": self.num_shares,
            "clip_range": self.clip_range,
            "levels": self.levels,
            "max_weight": self.max_weight,
            "tally_names": list(self.tally_names),
            "stochastic_rounding": self.stochastic_rounding,
            "chunk_size": self.chunk_size,
            "nonce": self.nonce,
            "keys": list(self.keys),
            "sizes": list(self.sizes),
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], stage: str) -> GroupConfig:
        group = str(payload.get("group", "?"))
        read = PayloadReader(payload, group, stage)
        return cls(
            group=read.get("group", str),
            num_clients=read.get("num_clients", int),
            threshold=read.get("threshold", int),
            num_shares=read.get("num_shares", int),
            clip_range=float(read.get("clip_range", (float, int))),
            levels=read.get("levels", int),
            max_weight=read.get("max_weight", int),
            tally_names=tuple(read.list_of("tally_names", str)),
            stochastic_rounding=read.get("stochastic_rounding", bool),
            chunk_size=read.get("chunk_size", int),
            nonce=read.get("nonce", bytes),
            keys=tuple(read.list_of("keys", str)),
            sizes=tuple(read.list_of("sizes", int)),
        )


class PayloadReader:
    """Typed access to a received payload; every failure names the group, stage and field."""

    def __init__(self, payload: Mapping[str, Any], group: str, stage: str) -> None:
        self.payload = payload
        self.group = group
        self.stage = stage

    def fail(self, field: str, reason: str) -> SecAggProtocolError:
        return SecAggProtocolError(self.group, self.stage, field, reason)

    def get(self, field: str, kind: type[T] | tuple[type, ...]) -> T:
        if field not in self.payload:
            raise self.fail(field, "missing")
        value = self.payload[field]
        if isinstance(value, bool) and kind is not bool:
            raise self.fail(field, "is a bool")
        if not isinstance(value, kind):
            raise self.fail(field, f"is {type(value).__name__}")
        return value  # type: ignore[return-value]

    def list_of(self, field: str, kind: type[T]) -> list[T]:
        values = self.get(field, list)
        if not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
            raise self.fail(field, f"must be a list of {kind.__name__}")
        return values

    def index_list(self, field: str, upper: int) -> list[int]:
        values = self.list_of(field, int)
        if any(not 0 <= v < upper for v in values) or len(set(values)) != len(values):
            raise self.fail(field, f"must hold distinct indices in [0, {upper})")
        return values

    def array(self, field: str, dtype: type, length: int) -> np.ndarray:
        value = self.get(field, np.ndarray)
        if value.dtype != np.dtype(dtype) or value.shape != (length,):
            raise self.fail(field, f"must be a {np.dtype(dtype)} vector of length {length}")
        return value


def ring_neighbourhood(members: Sequence[int], index: int, num_shares: int) -> list[int]:
    """`index` and its (num_shares - 1) / 2 nearest members on each side of the sorted ring."""
    ordered = sorted(members)
    if num_shares >= len(ordered):
        return ordered
    position = ordered.index(index)
    half = (num_shares - 1) // 2
    return sorted({ordered[(position + step) % len(ordered)] for step in range(-half, half + 1)})


def split_payload(payload: Mapping[str, PayloadValue]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(ConfigRecord-ready values, ArrayRecord-ready arrays) of a payload."""
    config = {k: v for k, v in payload.items() if not isinstance(v, np.ndarray)}
    arrays = {k: v for k, v in payload.items() if isinstance(v, np.ndarray)}
    return config, arrays


def join_payload(config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Payload:
    """The inverse of `split_payload`."""
    overlap = set(config) & set(arrays)
    if overlap:
        raise ValueError(f"field {sorted(overlap)[0]!r} is both a config value and an array")
    return {**config, **arrays}
