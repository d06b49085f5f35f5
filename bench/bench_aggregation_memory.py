"""Server peak memory of aggregation as sites are added: our streaming per-modality running sum
versus Flower's FedAvg pattern (every reply held, then averaged), ViT-S/16 weights, 3/10/30 sites.

Each measurement runs in a fresh subprocess (peak RSS via getrusage), replies are real Flower
ArrayRecords built from a real timm ViT-S/16 state dict, packed as a site sends them. The Flower pattern
is a stock strategy's, on the replies unpacked to one Array per tensor (as `PackedRecordsStrategy` hands
them to it): on packed records a stock strategy would average the buffers and the manifest's bytes.

    python bench/bench_aggregation_memory.py [--arch small] [--sites 3,10,30] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from _bench import add_smoke_flag, print_cpu


def _one(mode: str, arch: str, sites: int) -> dict[str, float]:
    import numpy as np
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from strategies.fedavg import ModalityAccumulator, SiteReply
    from strategies.protocol.flower_strategies import unpacked_record
    from strategies.protocol.records import arrays_to_record, record_to_numpy
    from visionfm_core.models.encoders import EncoderSpec, create_encoder, encoder_state

    base = {f"fundus/backbone.{k}": v.numpy() for k, v in encoder_state(create_encoder(EncoderSpec(arch))).items()}
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def reply(i: int) -> ArrayRecord:
        # What arrives from the network: one site's update as a fresh Flower ArrayRecord.
        return arrays_to_record({k: v + np.float32(i * 1e-3) for k, v in base.items()})

    started = time.perf_counter()
    if mode == "streaming":
        acc = ModalityAccumulator()
        for i in range(sites):
            record = reply(i)
            acc.add(SiteReply(f"s{i}", record_to_numpy(record), {"fundus": 100 + i}))
            del record
        result = acc.result()
    else:
        held = [RecordDict({"arrays": unpacked_record(reply(i)), "m": MetricRecord({"n": 100 + i})})
                for i in range(sites)]
        result = aggregate_arrayrecords(held, "n")
    seconds = time.perf_counter() - started
    assert len(result) == len(base)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mb": peak / 1024, "over_model_mb": (peak - baseline_rss) / 1024, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="small")
    parser.add_argument("--sites", default="3,10,30")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "SITES"), help=argparse.SUPPRESS)
    add_smoke_flag(parser)
    args = parser.parse_args()
    if args.smoke:
        args.arch, args.sites = "tiny", "2"  # one worker process per mode
    if args.worker:
        print(json.dumps(_one(args.worker[0], args.arch, int(args.worker[1]))))
        return
    print_cpu()
    counts = [int(s) for s in args.sites.split(",")]
    results: dict[str, dict[int, dict[str, float]]] = {}
    for mode in ("streaming", "flower-fedavg"):
        for n in counts:
            out = subprocess.run([sys.executable, __file__, "--arch", args.arch, "--worker", mode, str(n)],
                                 capture_output=True, text=True, check=True)
            results.setdefault(mode, {})[n] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"aggregation peak RSS, ViT-{args.arch} weights (MB above the process with one model loaded)")
    for mode, per in results.items():
        first = per[counts[0]]["over_model_mb"]
        cells = "  ".join(f"{n:>3} sites {v['over_model_mb']:8.0f} MB ({v['over_model_mb'] / first:4.2f}x)"
                          for n, v in per.items())
        print(f"{mode:14} {cells}")
    for n in counts:
        ratio = results["streaming"][n]["over_model_mb"] / max(results["flower-fedavg"][n]["over_model_mb"], 1e-3)
        print(f"{n:>3} sites: memory ratio streaming / flower-fedavg = {ratio:.2f}")


if __name__ == "__main__":
    main()
