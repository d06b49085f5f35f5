"""SecAgg+ versus plain weighted averaging of the same site updates: time and peak memory ratios.

Each measurement runs in a fresh subprocess so its peak RSS is its own. Both workers hold the same N
site models (float32, shaped like a real timm ViT, plus the global model) and import Flower, as a
server process does. Both sides do what the coordinator and the sites really do in a round:

    plain   the coordinator's plain FedAvg path per reply (server/federation/rounds.py): validate_reply
            (keys, shapes, NaN/Inf), then fold it into the streaming ModalityAccumulator
            (float64 sums); the averages at the end. Nothing runs on the sites.
    secagg  every stage of the protocol: each site computes its delta from the global model
            (strategies/protocol/secagg_stages.py), checks it and masks it; the server folds each masked vector into
            its running sum as it arrives (and frees it), unmasks, and adds the mean delta to the
            global model. Sites run one after the other in this process; each is timed on its own.

Serialisation is left out of both: the masked uint32 vector has the byte size of the float32 update.

The pair (plain, secagg) is measured `--reps` times, alternating which runs first; each pair gives
ratios, and the medians are printed. Times are wall clock and CPU time of the process (CPU time is
steadier when other processes share the cores, but still slowed by a busy sibling hyperthread).

Printed per (architecture, sites), medians over the pairs:
    plain s             validation + streaming average (the baseline of the ratios).
    (avg only)          the streaming average alone, without the validation.
    client s (max)      the slowest site's protocol time; server s: the coordinator's.
    time x (serial)     all sites + server in one process / plain.
    time x (parallel)   slowest site + server / plain: the round's critical path when every
                        hospital masks on its own machine, as in deployment; "cpu" the same in CPU time;
                        "min" the fastest secure round over the fastest plain one.
    x avg               the parallel time over the average alone (a stricter, unfair baseline: the
                        secure path's validation runs on the sites and is counted there).
    memory x            peak RSS / plain peak RSS; "data" subtracts each process' RSS after imports.

Usage: python bench/bench_secagg.py [--archs small base] [--sites 3 5] [--reps 3] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from _bench import add_smoke_flag, print_cpu

ROOT = Path(__file__).resolve().parents[1]
R = TypeVar("R")


def _peak_rss_mb() -> float:
    # VmHWM belongs to this process image; ru_maxrss would carry the parent's peak across exec.
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


class Clock:
    """Wall and CPU seconds accumulated over the calls it times."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def time(self, call: Callable[..., R], *args: Any) -> R:
        wall, cpu = time.perf_counter(), time.process_time()
        out = call(*args)
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu
        return out


def encoder_shapes(arch: str) -> dict[str, list[int]]:
    """Parameter shapes of the named encoder, built on the meta device (no memory, no download)."""
    import torch

    from visionfm_core.models.encoders import EncoderSpec, create_encoder

    with torch.device("meta"):
        encoder = create_encoder(EncoderSpec(arch=arch))
    return {f"fundus/{key}": list(value.shape) for key, value in encoder.state_dict().items()}


def _site_models(
    shapes: dict[str, list[int]], sites: int
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]], list[int]]:
    """(global model, each site's trained model = global + a small update, example counts)."""
    rng = np.random.default_rng(0)
    global_model = {
        key: rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02) for key, shape in shapes.items()
    }
    models = [
        {key: value + rng.standard_normal(value.shape, dtype=np.float32) * np.float32(1e-3)
         for key, value in global_model.items()}
        for _ in range(sites)
    ]  # fmt: skip
    weights = [int(w) for w in rng.integers(100, 5000, size=sites)]
    return global_model, models, weights


def worker_plain(shapes: dict[str, list[int]], sites: int) -> dict[str, float]:
    import flwr.common  # noqa: F401  (a server process has Flower loaded)

    from strategies.fedavg import ModalityAccumulator, SiteReply
    from strategies.validation import validate_reply

    baseline = _current_rss_mb()
    global_model, models, weights = _site_models(shapes, sites)
    everything, validation = Clock(), Clock()

    def average() -> dict[str, np.ndarray]:
        accumulator = ModalityAccumulator()
        for index, (model, weight) in enumerate(zip(models, weights, strict=True)):
            reply = SiteReply(f"site-{index}", model, {"fundus": weight})
            problem = validation.time(validate_reply, reply, global_model)
            if problem is not None:
                raise RuntimeError(str(problem))
            accumulator.add(reply)
        return accumulator.result()

    mean = everything.time(average)
    del mean
    return {
        "seconds": everything.wall,
        "cpu_seconds": everything.cpu,
        "average_seconds": everything.wall - validation.wall,
        "peak_rss_mb": _peak_rss_mb(),
        "baseline_rss_mb": baseline,
    }


def worker_secagg(shapes: dict[str, list[int]], sites: int, workers: int = 1) -> dict[str, float]:
    from strategies.secagg import SecAggClient, SecAggParams, SecAggServer

    baseline = _current_rss_mb()
    global_model, models, weights = _site_models(shapes, sites)
    nodes = list(range(1, sites + 1))
    site_clock = {node: Clock() for node in nodes}
    server_clock = Clock()

    def site_delta(model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # As strategies.protocol.secagg_stages.keep_update: the update leaves the site as a float32 delta.
        return {key: value - global_model[key] for key, value in model.items()}

    def masked_input(node: int, message: Any, model: dict[str, np.ndarray], weight: int) -> Any:
        return clients[node].masked_input(message, site_delta(model), weight)

    def new_global_model() -> dict[str, np.ndarray]:
        # As the coordinator does after a secure round (server/federation/rounds.py): in place, into the mean.
        return {key: np.add(result.mean[key], value, out=result.mean[key]) for key, value in global_model.items()}

    params = SecAggParams(max_weight=5000, clip_range=0.05)
    server_shapes = {k: tuple(v) for k, v in shapes.items()}
    server = server_clock.time(SecAggServer, "fundus", nodes, params, server_shapes, workers)
    clients = {node: SecAggClient(workers=workers) for node in nodes}
    messages = server_clock.time(server.setup)
    replies = {n: site_clock[n].time(clients[n].setup, messages[n]) for n in nodes}
    messages = server_clock.time(server.broadcast_keys, replies)
    replies = {n: site_clock[n].time(clients[n].share_keys, messages[n]) for n in nodes}
    messages = server_clock.time(server.relay_shares, replies)
    for index, node in enumerate(nodes):
        reply = site_clock[node].time(masked_input, node, messages[node], models[index], weights[index])
        server_clock.time(server.receive_masked, node, reply)
        del reply
    messages = server_clock.time(server.request_unmask)
    replies = {n: site_clock[n].time(clients[n].unmask, messages[n]) for n in nodes}
    result = server_clock.time(server.finish, replies)
    updated = server_clock.time(new_global_model)

    # Sanity check on one small array: the new global model matches the plain weighted average.
    key = min(shapes, key=lambda k: int(np.prod(shapes[k])))
    exact = sum(m[key].astype(np.float64) * w for m, w in zip(models, weights, strict=True)) / sum(weights)
    slowest = max(nodes, key=lambda n: site_clock[n].wall)
    return {
        "seconds": sum(c.wall for c in site_clock.values()) + server_clock.wall,
        "client_max_seconds": site_clock[slowest].wall,
        "server_seconds": server_clock.wall,
        "critical_cpu_seconds": max(c.cpu for c in site_clock.values()) + server_clock.cpu,
        "max_abs_error": float(np.abs(updated[key] - exact).max()),
        "peak_rss_mb": _peak_rss_mb(),
        "baseline_rss_mb": baseline,
    }


def _run_worker(kind: str, shapes_file: Path, sites: int, workers: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--worker", kind, "--shapes", str(shapes_file)]
    command += ["--sites", str(sites), "--workers", str(workers)]
    done = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _pair_row(plain: dict[str, float], secure: dict[str, float]) -> dict[str, float]:
    critical = secure["client_max_seconds"] + secure["server_seconds"]
    return {
        "plain": plain["seconds"],
        "plain_avg": plain["average_seconds"],
        "secagg": secure["seconds"],
        "client": secure["client_max_seconds"],
        "server": secure["server_seconds"],
        "serial": secure["seconds"] / plain["seconds"],
        "parallel": critical / plain["seconds"],
        "parallel_cpu": secure["critical_cpu_seconds"] / plain["cpu_seconds"],
        "x_avg": critical / plain["average_seconds"],
        "plain_mb": plain["peak_rss_mb"],
        "secagg_mb": secure["peak_rss_mb"],
        "memory": secure["peak_rss_mb"] / plain["peak_rss_mb"],
        "data": (secure["peak_rss_mb"] - secure["baseline_rss_mb"])
        / (plain["peak_rss_mb"] - plain["baseline_rss_mb"]),
        "error": secure["max_abs_error"],
    }


COLUMNS = [
    ("arch", 6, "", "{:<6}", ""), ("sites", 5, "", "{:>5}", ""), ("values", 7, "(M)", "{:>7.1f}", ""),
    ("plain s", 8, "", "{:>8.2f}", "plain"), ("plain s", 8, "avg only", "{:>8.2f}", "plain_avg"),
    ("secagg s", 9, "(all)", "{:>9.2f}", "secagg"), ("client s", 9, "(max)", "{:>9.2f}", "client"),
    ("server s", 9, "", "{:>9.2f}", "server"), ("time x", 7, "serial", "{:>7.2f}", "serial"),
    ("time x", 7, "par.", "{:>7.2f}", "parallel"), ("time x", 7, "par.cpu", "{:>7.2f}", "parallel_cpu"),
    ("time x", 7, "par.min", "{:>7.2f}", "parallel_best"),
    ("x avg", 6, "par.", "{:>6.2f}", "x_avg"), ("plain MB", 9, "", "{:>9.0f}", "plain_mb"),
    ("secagg MB", 9, "", "{:>9.0f}", "secagg_mb"), ("mem x", 6, "", "{:>6.2f}", "memory"),
    ("data x", 6, "", "{:>6.2f}", "data"), ("max err", 8, "", "{:>8.1e}", "error"),
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["small", "base"])
    parser.add_argument("--sites", nargs="+", type=int, default=[3, 5])
    parser.add_argument("--reps", type=int, default=3, help="(plain, secagg) pairs per configuration")
    parser.add_argument("--worker", choices=["plain", "secagg"])
    parser.add_argument("--shapes", type=Path)
    parser.add_argument("--workers", type=int, default=1, help="threads for SecAgg masking sweeps")
    add_smoke_flag(parser)
    args = parser.parse_args()
    if args.smoke:
        args.archs, args.sites, args.reps = ["nano"], [3], 1
    if args.worker:
        shapes = json.loads(args.shapes.read_text())
        if args.worker == "plain":
            print(json.dumps(worker_plain(shapes, args.sites[0])))
        else:
            print(json.dumps(worker_secagg(shapes, args.sites[0], args.workers)))
        return

    print_cpu()
    print("(time x, x avg, mem x, data x: ratios of SecAgg+ to the plain path measured in the same pair)")
    print(" ".join(f"{name:>{width}}" for name, width, _, _, _ in COLUMNS))
    print(" ".join(f"{unit:>{width}}" for _, width, unit, _, _ in COLUMNS))
    with tempfile.TemporaryDirectory() as folder:
        for arch in args.archs:
            shapes = encoder_shapes(arch)
            shapes_file = Path(folder) / f"{arch}.json"
            shapes_file.write_text(json.dumps(shapes))
            millions = sum(int(np.prod(s)) for s in shapes.values()) / 1e6
            for sites in args.sites:
                pairs = []
                for rep in range(args.reps):
                    kinds = ["plain", "secagg"] if rep % 2 == 0 else ["secagg", "plain"]
                    runs = {kind: _run_worker(kind, shapes_file, sites, args.workers) for kind in kinds}
                    pairs.append(_pair_row(runs["plain"], runs["secagg"]))
                medians = {key: statistics.median(pair[key] for pair in pairs) for key in pairs[0]}
                # Best case of each side: load from other processes only ever adds time.
                fastest_secure = min(pair["client"] + pair["server"] for pair in pairs)
                medians["parallel_best"] = fastest_secure / min(pair["plain"] for pair in pairs)
                row = [arch, sites, millions] + [medians[key] for *_, key in COLUMNS[3:]]
                print(" ".join(fmt.format(v) for (_, _, _, fmt, _), v in zip(COLUMNS, row, strict=True)), flush=True)


if __name__ == "__main__":
    main()
