"""Vectorised quantisation and masking: uint32 arithmetic that wraps modulo 2**32, in chunks.

A site's vector is [weight, clipped-value count, tallies..., quantised w*x values...]: the header
comes first so the server learns the total weight before it dequantises. Masks are AES-128-CTR
keystreams read as little-endian uint32, one stream per secret key. CTR mode can start anywhere, so
the vector is cut into ranges that worker threads sweep independently (OpenSSL and numpy release
the GIL); within a range each chunk is quantised (or unmasked) and masked (or dequantised) while it
sits in cache. No full mask is ever held. Sums of masked vectors wrap exactly like sums of the plain
ones.
"""

from __future__ import annotations

import bisect
import itertools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from strategies.secagg.crypto import mask_key
from strategies.secagg.params import GroupConfig

WORD = np.dtype("<u4")
WORDS_PER_BLOCK = 4  # one AES block is four uint32 words
MIN_RANGE = 1 << 20  # below this many words per worker, threads cost more than they save


def default_workers() -> int:
    """Threads for masking sweeps when the caller does not say: one.

    The sweeps thread correctly (OpenSSL's AES and numpy release the GIL; raw AES ran 2x faster on
    two threads), but on the shared two-core development machine the whole sweep got slower with
    two threads, so more than one is opt-in until measured on a site's hardware.
    """
    return 1


class MaskStream:
    """An AES-128-CTR keystream read as uint32 words, starting at word `start` of the stream."""

    def __init__(self, key: bytes, chunk_size: int, start: int = 0) -> None:
        block, skip = divmod(start, WORDS_PER_BLOCK)
        # The initial counter block is the block index (big-endian, as CTR increments it).
        counter = block.to_bytes(16, "big")
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
        self._zeros = bytes(4 * chunk_size)
        # update_into needs room for one block more than the input.
        self._buffer = bytearray(4 * chunk_size + 16)
        if skip:
            self.next(skip)

    def next(self, count: int) -> np.ndarray:
        """The next `count` words (a view valid until the following call)."""
        self._encryptor.update_into(memoryview(self._zeros)[: 4 * count], self._buffer)
        return np.frombuffer(self._buffer, dtype=WORD, count=count)


def stream_key(secret: bytes, config: GroupConfig, context: bytes) -> bytes:
    """The AES key of `secret`'s mask in this group and round (`context` separates self and pair masks)."""
    return mask_key(secret, config.nonce, context)


def chunks(length: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive chunks covering [0, length)."""
    for start in range(0, length, chunk_size):
        yield start, min(length, start + chunk_size)


def ranges(start: int, stop: int, workers: int) -> list[tuple[int, int]]:
    """Split [start, stop) into up to `workers` ranges whose inner bounds fall on AES blocks."""
    parts = max(1, min(workers, (stop - start) // MIN_RANGE))
    bounds = [start]
    for part in range(1, parts):
        cut = start + (stop - start) * part // parts
        bounds.append(cut - cut % WORDS_PER_BLOCK)
    bounds.append(stop)
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def _run_ranges(work: Callable[[int, int], None], spans: list[tuple[int, int]]) -> None:
    if len(spans) == 1:
        work(*spans[0])
        return
    with ThreadPoolExecutor(max_workers=len(spans)) as pool:
        for future in [pool.submit(work, a, b) for a, b in spans]:
            future.result()


class Masker:
    """Adds the streams of `adding` keys and subtracts those of `subtracting` keys, from word `start`."""

    def __init__(self, adding: Sequence[bytes], subtracting: Sequence[bytes], chunk_size: int, start: int) -> None:
        self.adding = [MaskStream(key, chunk_size, start) for key in adding]
        self.subtracting = [MaskStream(key, chunk_size, start) for key in subtracting]

    def apply(self, piece: np.ndarray) -> None:
        """In place, modulo 2**32, on the next `piece.size` words (at most one chunk)."""
        for stream in self.adding:
            piece += stream.next(piece.size)
        for stream in self.subtracting:
            piece -= stream.next(piece.size)


def apply_masks(
    vector: np.ndarray, adding: Sequence[bytes], subtracting: Sequence[bytes], chunk_size: int, workers: int = 1
) -> None:
    """In place: vector += sum(adding streams) - sum(subtracting streams), modulo 2**32."""

    def work(start: int, stop: int) -> None:
        masker = Masker(adding, subtracting, chunk_size, start)
        for low, high in chunks(stop - start, chunk_size):
            masker.apply(vector[start + low : start + high])

    _run_ranges(work, ranges(0, vector.size, workers))


def add_into(total: np.ndarray, vector: np.ndarray, workers: int = 1) -> None:
    """total += vector, modulo 2**32, split over threads for large vectors."""

    def work(start: int, stop: int) -> None:
        np.add(total[start:stop], vector[start:stop], out=total[start:stop])

    _run_ranges(work, ranges(0, total.size, workers))


def _uniform(words: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Floats uniform on [1, 2) from random uint32 words: 23 random mantissa bits under exponent 0."""
    np.right_shift(words, np.uint32(9), out=scratch)
    np.bitwise_or(scratch, np.uint32(0x3F800000), out=scratch)
    return scratch.view(np.float32)


class Quantiser:
    """Maps weighted values w*x in [-C, C] to integers in [0, levels] and sums of them back.

    Nominally [0, levels - 1]; float32 rounding can carry a value at the top to `levels`, which the
    overflow rule (sites x levels < 2**32) leaves room for. Stochastic rounding is floor(v + u), u
    uniform on [0, 1). The arithmetic is float32 (twice as fast as float64 here); with at most 2**22
    levels its rounding adds under 3/8 of a level, so each site's error stays below 1.5 steps (below
    1 step when rounding to nearest). One instance per thread: it owns scratch buffers.
    """

    def __init__(self, config: GroupConfig) -> None:
        self.clip_range = config.clip_range
        self.levels = config.levels
        self.step = 2.0 * config.clip_range / (config.levels - 1)
        self._work = np.empty(config.chunk_size, dtype=np.float32)
        self._bits = np.empty(config.chunk_size, dtype=np.uint32)
        # Rounding noise from AES-CTR under a throwaway key: three times faster than numpy's floats.
        self._noise = MaskStream(os.urandom(16), config.chunk_size) if config.stochastic_rounding else None

    def quantise_into(self, values: np.ndarray, factor: float, out: np.ndarray) -> None:
        """Write quantised `factor * values` (at most one chunk) into uint32 `out`."""
        buffer = self._work[: values.size]
        np.multiply(values, np.float32(factor / self.step), out=buffer)
        buffer += np.float32(self.clip_range / self.step)
        np.clip(buffer, np.float32(0.0), np.float32(self.levels - 1), out=buffer)
        if self._noise is not None:
            buffer += _uniform(self._noise.next(values.size), self._bits[: values.size])
            buffer -= np.float32(1.0)
        else:
            buffer += np.float32(0.5)
        # Truncation is floor here because every value is >= 0.
        out[:] = buffer

    def dequantise_in_place(self, piece: np.ndarray, num_sites: int, divisor: float) -> np.ndarray:
        """(sum of w*x) / divisor from a uint32 sum of `num_sites` quantised pieces, as float32.

        The result overwrites `piece` (both are 4-byte words), so unmasking needs no second buffer.
        """
        block = piece.astype(np.float64)
        block *= self.step
        block -= num_sites * self.clip_range
        block /= divisor
        result = piece.view(np.float32)
        result[:] = block
        return result


def count_clipped(key: str, values: np.ndarray, factor: float, clip_range: float) -> int:
    """How many of `factor * values` fall outside [-C, C]; raises ValueError naming `key` on NaN/Inf."""
    if not values.size:
        return 0
    # max and min read the array twice but allocate nothing, and NaN propagates through both.
    high, low = float(values.max()), float(values.min())
    if not (np.isfinite(high) and np.isfinite(low)):
        raise ValueError(f"{key!r} holds NaN or Inf")
    if max(high, -low) * factor <= clip_range:
        return 0
    return int(np.count_nonzero(np.abs(values) * factor > clip_range))


def header_length(config: GroupConfig) -> int:
    """Words before the values: weight, clipped-value count, then one per tally."""
    return 2 + len(config.tally_names)


class _Layout:
    """Where each array's values sit in the vector (after the header)."""

    def __init__(self, config: GroupConfig) -> None:
        self.keys = config.keys
        self.starts: list[int] = []
        position = header_length(config)
        for size in config.sizes:
            self.starts.append(position)
            position += size
        self.stop = position

    def pieces(self, start: int, stop: int) -> Iterator[tuple[str, int, int, int]]:
        """(key, offset in the array, vector start, vector stop) for the values within [start, stop)."""
        index = max(0, bisect.bisect_right(self.starts, start) - 1)
        while index < len(self.keys) and self.starts[index] < stop:
            end = self.starts[index + 1] if index + 1 < len(self.starts) else self.stop
            low, high = max(start, self.starts[index]), min(stop, end)
            if high > low:
                yield self.keys[index], low - self.starts[index], low, high
            index += 1


def masked_site_vector(
    config: GroupConfig,
    values: Mapping[str, np.ndarray],
    factor: float,
    header: Sequence[int],
    adding: Sequence[bytes],
    subtracting: Sequence[bytes],
    workers: int = 1,
) -> np.ndarray:
    """The site's whole vector, quantised and masked chunk by chunk (ranges in parallel)."""
    layout = _Layout(config)
    vector = np.empty(config.vector_length, dtype=np.uint32)
    flat = {key: values[key].reshape(-1) for key in config.keys}
    head = len(header)

    def work(start: int, stop: int) -> None:
        masker = Masker(adding, subtracting, config.chunk_size, start)
        quantiser = Quantiser(config)
        if start < head:
            vector[start : min(stop, head)] = np.asarray(header[start : min(stop, head)], dtype=np.uint32)
            masker.apply(vector[start : min(stop, head)])
        for key, offset, low, high in layout.pieces(max(start, head), stop):
            for a, b in chunks(high - low, config.chunk_size):
                piece = vector[low + a : low + b]
                quantiser.quantise_into(flat[key][offset + a : offset + b], factor, piece)
                masker.apply(piece)

    _run_ranges(work, ranges(0, config.vector_length, workers))
    return vector


def unmask_and_dequantise(
    config: GroupConfig,
    total: np.ndarray,
    adding: Sequence[bytes],
    subtracting: Sequence[bytes],
    num_sites: int,
    workers: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """(header sums, float32 weighted mean of the values) from the masked uint32 sum.

    The mean overwrites `total`. Returns an empty mean when the total weight is zero.
    """
    head = header_length(config)
    Masker(adding, subtracting, config.chunk_size, 0).apply(total[:head])
    header = total[:head].copy()
    weight = int(header[0])
    if weight == 0:
        return header, np.empty(0, dtype=np.float32)
    divisor = weight / config.max_weight

    def work(start: int, stop: int) -> None:
        masker = Masker(adding, subtracting, config.chunk_size, start)
        quantiser = Quantiser(config)
        for low, high in chunks(stop - start, config.chunk_size):
            piece = total[start + low : start + high]
            masker.apply(piece)
            quantiser.dequantise_in_place(piece, num_sites, divisor)

    _run_ranges(work, ranges(head, config.vector_length, workers))
    return header, total[head:].view(np.float32)
