"""Bytes one site sends per round with each transport codec, against fp32, on real ViT shapes.

For each encoder size: payload bytes per codec and their ratio to fp32 (target: int8 <= 0.27x),
the relative RMS roundtrip error on a delta-like update (normal, std 1e-3) and the encode + decode
time. The effect on the downstream probe score (target: <= 0.5 AUC points lost with int8) needs a
federated run and is measured in the integration benchmarks, not here.

Usage: python bench/bench_compression.py [--archs small base]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from strategies.compression import CODECS, decode, encode
from visionfm_core.models.encoders import EncoderSpec, create_encoder


def delta_like_update(arch: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A float32 delta shaped like the named encoder (shapes from the meta device: no download)."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in create_encoder(EncoderSpec(arch=arch)).state_dict().items()}
    rng = np.random.default_rng(seed)
    return {f"fundus/{k}": rng.standard_normal(s, dtype=np.float32) * np.float32(1e-3) for k, s in shapes.items()}


def relative_rms_error(original: dict[str, np.ndarray], decoded: dict[str, np.ndarray]) -> float:
    error = sum(float(np.sum((decoded[k].astype(np.float64) - v) ** 2)) for k, v in original.items())
    energy = sum(float(np.sum(v.astype(np.float64) ** 2)) for v in original.values())
    return (error / energy) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["small", "base"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"{'arch':<6} {'codec':<5} {'MB sent':>9} {'x fp32':>7} {'rel. RMS err':>13} {'enc+dec s':>10}")
    for arch in args.archs:
        update = delta_like_update(arch)
        fp32_bytes = encode(update, "fp32").nbytes
        for codec in CODECS:
            start = time.perf_counter()
            encoded = encode(update, codec)
            decoded = decode(encoded.arrays, codec)
            seconds = time.perf_counter() - start
            print(
                f"{arch:<6} {codec:<5} {encoded.nbytes / 2**20:>9.1f} {encoded.nbytes / fp32_bytes:>7.4f}"
                f" {relative_rms_error(update, decoded):>13.2e} {seconds:>10.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
