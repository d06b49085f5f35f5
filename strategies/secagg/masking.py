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
from typing import TypeVar

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from strategies.secagg.crypto import mask_key
from strategies.secagg.params import GroupConfig

WORD = np.dtype("<u4")
WORDS_PER_BLOCK = 4  # one AES block is four uint32 words
MIN_RANGE = 1 << 20  # below this many words per worker, threads cost more than they save
T = TypeVar("T")


def default_workers() -> int:
    """Threads for masking sweeps when the caller does not say: one.

    The sweeps thread correctly (OpenSSL's AES and numpy release the GIL; raw AES ran 2x faster on
    two threads), but on the shared two-core development machine the whole sweep got slower with
    two threads, so more than one is opt-in until measured on a site's hardware.
    """
    return 1


class Scratch:
    """The zeros AES encrypts and the buffer it writes to, for keystream chunks of up to `chunk_size` words.

    Streams used one after the other (a `Masker`'s) share one, so a chunk's working set stays in
    the L2 cache however many neighbours a site has.
    """

    def __init__(self, chunk_size: int) -> None:
        self.zeros = memoryview(bytes(4 * chunk_size))
        # update_into needs room for one block more than the input.
        self.buffer = bytearray(4 * chunk_size + 16)


class MaskStream:
    """An AES-128-CTR keystream read as uint32 words, starting at word `start` of the stream.

    Values returned by `next` live in the `scratch` buffer until the next call on any stream that
    shares it.
    """

    def __init__(self, key: bytes, chunk_size: int, start: int = 0, scratch: Scratch | None = None) -> None:
        block, skip = divmod(start, WORDS_PER_BLOCK)
        # The initial counter block is the block index (big-endian, as CTR increments it).
        counter = block.to_bytes(16, "big")
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
        self._scratch = scratch or Scratch(chunk_size)
        if skip:
            self.next(skip)

    def next(self, count: int) -> np.ndarray:
        """The next `count` words (a view valid until the following call)."""
        self._encryptor.update_into(self._scratch.zeros[: 4 * count], self._scratch.buffer)
        return np.frombuffer(self._scratch.buffer, dtype=WORD, count=count)

    def next_bytes(self, count: int) -> np.ndarray:
        """The next `count` bytes (at most 4 * chunk_size) as uint8, a view valid until the next call."""
        self._encryptor.update_into(self._scratch.zeros[:count], self._scratch.buffer)
        return np.frombuffer(self._scratch.buffer, dtype=np.uint8, count=count)


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


def _run_ranges(work: Callable[[int, int], T], spans: list[tuple[int, int]]) -> list[T]:
    """work(start, stop) for every span, on one thread per span when there are several."""
    if len(spans) <= 1:
        return [work(a, b) for a, b in spans]
    with ThreadPoolExecutor(max_workers=len(spans)) as pool:
        return [future.result() for future in [pool.submit(work, a, b) for a, b in spans]]


class Masker:
    """Adds the streams of `adding` keys and subtracts those of `subtracting` keys, from word `start`."""

    def __init__(self, adding: Sequence[bytes], subtracting: Sequence[bytes], chunk_size: int, start: int) -> None:
        scratch = Scratch(chunk_size)
        self.adding = [MaskStream(key, chunk_size, start, scratch) for key in adding]
        self.subtracting = [MaskStream(key, chunk_size, start, scratch) for key in subtracting]

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


FRACTION_BITS = 8  # quantise in 1/256ths of a level, then round with one random byte per value
ONE_LEVEL = 1 << FRACTION_BITS


class Quantiser:
    """Maps weighted values w*x in [-C, C] to integers in [0, levels - 1] and sums of them back.

    The arithmetic is float32 then int32, in place, a chunk at a time. A value is first scaled to
    V = 256 * (w*x + C) / step, a float in [0, 256 * (levels - 1)] (float32 rounding moves it by under
    3/8 of a level with at most 2**22 levels: the scaling by 256 is exact), truncated to an integer,
    and rounded to a level by adding one random byte (stochastic: unbiased to 1/256 of a level) or
    128 (to nearest) and shifting right by 8. Each site's error stays below 1.5 steps. The random
    bytes are an AES-CTR keystream under a throwaway key: four values per AES word, where a float
    uniform would take one word each (AES is the largest cost of masking). One instance per thread:
    it owns scratch buffers.
    """

    def __init__(self, config: GroupConfig) -> None:
        self.clip_range = config.clip_range
        self.levels = config.levels
        self.step = 2.0 * config.clip_range / (config.levels - 1)
        self._work = np.empty(config.chunk_size, dtype=np.float32)
        self._top = np.float32(ONE_LEVEL * (config.levels - 1))  # exact: at most 30 significant bits
        self._offset = np.float32(ONE_LEVEL * config.clip_range / self.step)
        # Rounding noise needs no secrecy (the masks give that), only independence from the values.
        self._noise = (
            MaskStream(os.urandom(16), config.chunk_size, scratch=Scratch((config.chunk_size + 3) // 4))
            if config.stochastic_rounding
            else None
        )

    def quantise_into(self, values: np.ndarray, factor: float, out: np.ndarray) -> int:
        """Write quantised `factor * values` (at most one chunk) into uint32 `out`.

        Returns how many values fell outside [-C, C] (they sit on the end levels); raises
        ValueError when a value is NaN or Inf.
        """
        scaled = self._work[: values.size]
        with np.errstate(over="ignore", invalid="ignore"):  # overflow and NaN are handled in _clip
            np.multiply(values, np.float32(ONE_LEVEL * factor / self.step), out=scaled)
            scaled += self._offset
        clipped = self._clip(values, scaled)
        fixed = out.view(np.int32)
        # Truncation is floor here because every value is >= 0; int32 holds up to 2**31 > 256 * 2**22.
        np.copyto(fixed, scaled, casting="unsafe")
        if self._noise is not None:
            np.add(fixed, self._noise.next_bytes(values.size), out=fixed)
        else:
            fixed += ONE_LEVEL // 2
        fixed >>= FRACTION_BITS
        return clipped

    def _clip(self, values: np.ndarray, scaled: np.ndarray) -> int:
        # The chunk's min and max (in cache; NaN propagates through both) cost less than clipping
        # it, and replace a separate validation pass over the whole update in memory.
        if values.size == 0:
            return 0
        low, high = float(scaled.min()), float(scaled.max())
        if low >= 0.0 and high <= self._top:
            return 0
        if not np.isfinite(values).all():
            raise ValueError("holds NaN or Inf")
        outside = int(np.count_nonzero((scaled < 0.0) | (scaled > self._top)))
        np.clip(scaled, np.float32(0.0), self._top, out=scaled)
        return outside

    def dequantise_in_place(self, piece: np.ndarray, num_sites: int, divisor: float) -> np.ndarray:
        """(sum of w*x) / divisor from a uint32 sum of `num_sites` quantised pieces, as float32.

        The result overwrites `piece` (both are 4-byte words), so unmasking needs no second buffer.
        A sum holds num_sites * (levels - 1) / 2 for a zero value; subtracting that centre in uint32
        leaves a signed int32 (num_sites * levels < 2**32), which float32 holds exactly up to 2**24
        and otherwise to 2**-24 relative, far below the quantisation error.
        """
        whole, half = divmod(num_sites * (self.levels - 1), 2)  # the centre, a multiple of 1/2
        scale = self.step / divisor
        piece -= np.uint32(whole)
        work = self._work[: piece.size]
        np.copyto(work, piece.view(np.int32), casting="unsafe")
        result = piece.view(np.float32)
        np.multiply(work, np.float32(scale), out=result)
        if half:
            result -= np.float32(0.5 * scale)
        return result


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
    weight: int,
    tallies: Sequence[int],
    adding: Sequence[bytes],
    subtracting: Sequence[bytes],
    workers: int = 1,
) -> np.ndarray:
    """The site's whole vector, quantised and masked chunk by chunk (ranges in parallel).

    The values are checked on the way (ValueError naming the key of a NaN or Inf), and the header
    [weight, clipped-value count, tallies...] is written and masked once the sweep has counted.
    """
    layout = _Layout(config)
    vector = np.empty(config.vector_length, dtype=np.uint32)
    flat = {key: values[key].reshape(-1) for key in config.keys}
    head = header_length(config)

    def work(start: int, stop: int) -> int:
        masker = Masker(adding, subtracting, config.chunk_size, start)
        quantiser = Quantiser(config)
        clipped = 0
        for key, offset, low, high in layout.pieces(start, stop):
            for a, b in chunks(high - low, config.chunk_size):
                piece = vector[low + a : low + b]
                try:
                    clipped += quantiser.quantise_into(flat[key][offset + a : offset + b], factor, piece)
                except ValueError as error:
                    raise ValueError(f"{key!r} {error}") from None
                masker.apply(piece)
        return clipped

    clipped = sum(_run_ranges(work, ranges(head, config.vector_length, workers)))
    header = [int(weight), min(clipped, config.weight_cap_per_site), *(int(t) for t in tallies)]
    if len(header) != head:
        raise ValueError(f"expected {head - 2} tallies, got {len(header) - 2}")
    vector[:head] = np.asarray(header, dtype=np.uint32)
    Masker(adding, subtracting, config.chunk_size, 0).apply(vector[:head])
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
