"""Gaussian noise from a cryptographically secure generator, for differential privacy.

torch's and numpy's default generators (Mersenne Twister, PCG64) are fast but predictable: whoever
learns their seed, or enough of their output, can reproduce the rest and subtract the noise. Here the
random bits are an AES-128-CTR keystream under a fresh key from `os.urandom` (indistinguishable from
random as long as AES is a pseudo-random permutation), turned into normals by the Box-Muller
transform one cache-sized chunk at a time. Nothing about the noise depends on torch's or numpy's
global seeds, the run seed or the process.

Floating-point caveat (Mironov 2012, "On significance of the least significant bits for differential
privacy"; Jin et al. 2022, "Are we there yet? Timing and floating-point attacks on differential
privacy systems"): a floating-point sampler only approximates the Gaussian mechanism. Its outputs lie
on a value-dependent grid, its tails end where the uniform runs out of bits, and `value + noise`
is rounded to float32, so in principle some outputs could be produced from one dataset and not from
a neighbouring one. Mitigations: the radius uses a 53-bit uniform in float64, so the tails reach
sqrt(-2 ln 2**-54) = 8.6 standard deviations (the 24-bit uniforms behind CPU `torch.randn` stop at
5.8, where a sum of millions of coordinates makes hitting the edge a real event), and the angle a
24-bit uniform. The remaining grid effects are those of every float DP library (Opacus, TF Privacy);
removing them needs an exact discrete Gaussian on a fixed-point grid (Canonne, Kamath and Steinke
2020) at a much higher cost. Keep noise multipliers away from the edge of a budget accordingly.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import overload

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_BYTES = 16  # AES-128: the fastest AES-NI key size, 128-bit security
RADIUS_BYTES = 8  # one 64-bit word per Box-Muller pair for the radius (53 bits used)
ANGLE_BYTES = 4  # one 32-bit word per pair for the angle (24 bits used)
DEFAULT_CHUNK = 1 << 15  # normals per chunk: the float64 radius and its scratch stay in L2 cache


def key_from_seed(seed: int) -> bytes:
    """A fixed AES key from an integer seed: reproducible noise for tests, never for real runs."""
    return hashlib.sha256(b"visionfm-secure-noise/test-seed/" + str(int(seed)).encode()).digest()[:KEY_BYTES]


class SecureGaussian:
    """Standard normal float32 values from an AES-128-CTR keystream (key from the OS by default).

    `normal(loc, scale, size)` mirrors `numpy.random.Generator.normal`, so it can stand in where
    a numpy generator was passed. Not thread-safe: one instance per thread.
    """

    def __init__(self, key: bytes | None = None, chunk_size: int = DEFAULT_CHUNK) -> None:
        key = os.urandom(KEY_BYTES) if key is None else bytes(key)
        if len(key) != KEY_BYTES:
            raise ValueError(f"a secure-noise key has {KEY_BYTES} bytes, got {len(key)}")
        if chunk_size < 2:
            raise ValueError(f"chunk_size must be at least 2, got {chunk_size}")
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        pairs = (chunk_size + 1) // 2
        self._pairs = pairs
        self._zeros = bytes((RADIUS_BYTES + ANGLE_BYTES) * pairs)
        self._raw = bytearray(len(self._zeros) + 16)  # update_into wants a block of headroom
        self._bits64 = np.empty(pairs, np.uint64)
        self._bits32 = np.empty(pairs, np.uint32)
        self._radius = np.empty(pairs, np.float64)
        self._radius32 = np.empty(pairs, np.float32)
        self._angle = np.empty(pairs, np.float32)
        self._trig = np.empty(pairs, np.float32)

    def fill(self, out: np.ndarray) -> None:
        """Overwrite a contiguous float32 array with independent standard normals."""
        if out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError("fill needs a C-contiguous float32 array")
        flat = out.reshape(-1)
        step = 2 * self._pairs
        for start in range(0, flat.size, step):
            self._fill_chunk(flat[start : start + step])

    def standard_normal(self, size: int | tuple[int, ...]) -> np.ndarray:
        """A new float32 array of standard normals."""
        out = np.empty(size, np.float32)
        self.fill(out)
        return out

    @overload
    def normal(self, loc: float = ..., scale: float = ..., size: None = None) -> float: ...

    @overload
    def normal(self, loc: float, scale: float, size: int | tuple[int, ...]) -> np.ndarray: ...

    def normal(
        self, loc: float = 0.0, scale: float = 1.0, size: int | tuple[int, ...] | None = None
    ) -> np.ndarray | float:
        """N(loc, scale**2) samples: a float when `size` is None, else a float32 array."""
        if not scale >= 0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        draws = self.standard_normal(1 if size is None else size)
        if size is None:
            return float(loc) + float(scale) * float(draws[0])
        draws *= np.float32(scale)
        draws += np.float32(loc)
        return draws

    def _fill_chunk(self, out: np.ndarray) -> None:
        """Box-Muller on ceil(len/2) pairs: cos-normals into the first half, sin-normals into the rest."""
        pairs = (out.size + 1) // 2
        raw = self._keystream((RADIUS_BYTES + ANGLE_BYTES) * pairs)
        words = np.frombuffer(raw, np.uint64, pairs)
        angle_words = np.frombuffer(raw, np.uint32, pairs, offset=RADIUS_BYTES * pairs)
        radius, radius32 = self._radius[:pairs], self._radius32[:pairs]
        angle, trig = self._angle[:pairs], self._trig[:pairs]
        # u = (k + 1/2) / 2**53 with k uniform on 53 bits: never 0, so log is finite.
        bits64, bits32 = self._bits64[:pairs], self._bits32[:pairs]
        # Shifted right the words fit int64, whose conversion to float is vectorised (uint64's is not).
        np.right_shift(words, np.uint64(11), out=bits64)
        np.copyto(radius, bits64.view(np.int64), casting="unsafe")
        radius += 0.5
        radius *= 2.0**-53
        np.log(radius, out=radius)
        radius *= -2.0
        np.sqrt(radius, out=radius)
        np.copyto(radius32, radius, casting="same_kind")
        np.right_shift(angle_words, np.uint32(8), out=bits32)
        np.copyto(angle, bits32.view(np.int32), casting="unsafe")
        angle *= np.float32(2.0 * math.pi / (1 << 24))
        first = out[:pairs]
        np.cos(angle, out=trig)
        np.multiply(radius32, trig, out=first)
        second = out[pairs:]
        np.sin(angle[: second.size], out=trig[: second.size])
        np.multiply(radius32[: second.size], trig[: second.size], out=second)

    def _keystream(self, count: int) -> memoryview:
        self._encryptor.update_into(memoryview(self._zeros)[:count], self._raw)
        return memoryview(self._raw)[:count]
