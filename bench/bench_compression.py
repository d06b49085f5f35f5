"""Bytes one site sends per round with each transport codec, against fp32, on real ViT shapes.

For each encoder size: payload bytes per codec and their ratio to fp32 (target: int8 <= 0.27x),
the relative RMS roundtrip error on a delta-like update (normal, std 1e-3) and the encode + decode
time.

With --probe SCENARIO: the effect on the probe score (target: <= 0.5 AUC points lost with int8). The
same federation (`visionfm simulate`, same seed, so the same data order, crops and initial weights)
runs once per codec; printed are the held-out test k-NN and linear-probe AUC of the final encoders and
each codec's difference to fp32, in AUC points, plus the bytes the sites sent.

Usage: python bench/bench_compression.py [--archs small base] [--probe default] [--codecs none int8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from _bench import add_smoke_flag, print_cpu

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


def probe_effect(scenario: str, codecs: list[str], out_root: Path) -> None:
    """One federation per codec on `scenario`; final test-probe AUCs and their change against no codec."""
    from simulations.compare import test_scores
    from simulations.simulate import simulate

    results: dict[str, tuple[dict[str, dict[str, float]], float]] = {}
    for codec in codecs:
        outcome = simulate(scenario, "federated", out_root / codec, {"compression": codec})
        rows = outcome.metrics.rows
        sent = sum(float(r["bytes_sent"]) for r in rows if r["phase"] == "transport")
        results[codec] = (test_scores(outcome.metrics)["federated"], sent)
    reference, reference_bytes = results[codecs[0]]
    print(f"\nprobe effect on scenario {scenario!r} (held-out test split, last round; AUC points vs {codecs[0]}):")
    for codec, (scores, sent) in results.items():
        for modality, values in scores.items():
            knn, linear = values["knn_auc"], values["linear_auc"]
            knn_change = 100 * (knn - reference[modality]["knn_auc"])
            linear_change = 100 * (linear - reference[modality]["linear_auc"])
            print(f"  {codec:<5} {modality:<7} k-NN AUC {knn:.4f} ({knn_change:+.2f})  linear AUC {linear:.4f}"
                  f" ({linear_change:+.2f})  bytes sent {sent / reference_bytes:.4f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["small", "base"])
    parser.add_argument("--probe", default=None, help="scenario for the probe-effect runs (e.g. default)")
    parser.add_argument("--codecs", nargs="+", default=["none", "int8"], help="codecs of the probe runs")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-compression"))
    add_smoke_flag(parser)
    args = parser.parse_args()
    if args.smoke:
        args.archs, args.probe = ["nano"], None
    print_cpu()
    torch.set_num_threads(2)
    if args.probe:
        probe_effect(args.probe, args.codecs, args.out)
        return
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
        int8 = encode(update, "int8").nbytes if "int8" in CODECS else fp32_bytes
        print(f"{arch}: bytes ratio int8 / fp32 = {int8 / fp32_bytes:.4f} (target <= 0.27)")


if __name__ == "__main__":
    main()
