"""SecAgg+ versus plain weighted averaging of the same site dicts: time and peak memory ratios.

Each measurement runs in a fresh subprocess so its peak RSS is its own. Both workers hold the same N
site dicts (deltas shaped like a real timm ViT, float32) and import Flower, as a server process does.

    plain   strategies.fedavg.weighted_average over the N dicts.
    secagg  every stage of the protocol in one process: N clients one after the other, then the
            server (stage 4 is streamed: each masked vector is folded into the running sum and freed).

Printed per (architecture, sites):
    time x (serial)     all clients + server in one process / plain averaging.
    time x (parallel)   slowest client + server / plain averaging: the round's critical path when
                        every hospital masks on its own machine, as in deployment.
    memory x            peak RSS / plain peak RSS; "data" subtracts each process' RSS after imports.

Usage: python bench/bench_secagg.py [--archs small base] [--sites 3 5] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


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


def encoder_shapes(arch: str) -> dict[str, list[int]]:
    """Parameter shapes of the named encoder, built on the meta device (no memory, no download)."""
    import torch

    from visionfm_core.models.encoders import EncoderSpec, create_encoder

    with torch.device("meta"):
        encoder = create_encoder(EncoderSpec(arch=arch))
    return {f"fundus/{key}": list(value.shape) for key, value in encoder.state_dict().items()}


def _site_dicts(shapes: dict[str, list[int]], sites: int) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    rng = np.random.default_rng(0)
    dicts = [
        {key: rng.standard_normal(shape, dtype=np.float32) * np.float32(1e-3) for key, shape in shapes.items()}
        for _ in range(sites)
    ]
    weights = [int(w) for w in rng.integers(100, 5000, size=sites)]
    return dicts, weights


def worker_plain(shapes: dict[str, list[int]], sites: int) -> dict[str, float]:
    import flwr.common  # noqa: F401  (a server process has Flower loaded)

    from strategies.fedavg import weighted_average

    baseline = _current_rss_mb()
    dicts, weights = _site_dicts(shapes, sites)
    start = time.perf_counter()
    mean = weighted_average([(d, float(w)) for d, w in zip(dicts, weights, strict=True)])
    seconds = time.perf_counter() - start
    del mean
    return {"seconds": seconds, "peak_rss_mb": _peak_rss_mb(), "baseline_rss_mb": baseline}


def worker_secagg(shapes: dict[str, list[int]], sites: int, workers: int = 1) -> dict[str, float]:
    from strategies.secagg import SecAggClient, SecAggParams, SecAggServer

    baseline = _current_rss_mb()
    dicts, weights = _site_dicts(shapes, sites)
    nodes = list(range(1, sites + 1))
    client_seconds = dict.fromkeys(nodes, 0.0)
    server_seconds = 0.0

    def timed_server(call, *args):
        nonlocal server_seconds
        start = time.perf_counter()
        out = call(*args)
        server_seconds += time.perf_counter() - start
        return out

    def timed_client(node, call, *args):
        start = time.perf_counter()
        out = call(*args)
        client_seconds[node] += time.perf_counter() - start
        return out

    params = SecAggParams(max_weight=5000, clip_range=0.05)
    server_shapes = {k: tuple(v) for k, v in shapes.items()}
    server = timed_server(SecAggServer, "fundus", nodes, params, server_shapes, workers)
    clients = {node: SecAggClient(workers=workers) for node in nodes}
    messages = timed_server(server.setup)
    replies = {n: timed_client(n, clients[n].setup, messages[n]) for n in nodes}
    messages = timed_server(server.broadcast_keys, replies)
    replies = {n: timed_client(n, clients[n].share_keys, messages[n]) for n in nodes}
    messages = timed_server(server.relay_shares, replies)
    for index, node in enumerate(nodes):
        reply = timed_client(node, clients[node].masked_input, messages[node], dicts[index], weights[index])
        timed_server(server.receive_masked, node, reply)
        del reply
    messages = timed_server(server.request_unmask)
    replies = {n: timed_client(n, clients[n].unmask, messages[n]) for n in nodes}
    result = timed_server(server.finish, replies)

    # Sanity check on one small array: the secure mean matches the plain one.
    key = min(shapes, key=lambda k: int(np.prod(shapes[k])))
    exact = sum(d[key].astype(np.float64) * w for d, w in zip(dicts, weights, strict=True)) / sum(weights)
    return {
        "seconds": sum(client_seconds.values()) + server_seconds,
        "client_max_seconds": max(client_seconds.values()),
        "server_seconds": server_seconds,
        "max_abs_error": float(np.abs(result.mean[key] - exact).max()),
        "peak_rss_mb": _peak_rss_mb(),
        "baseline_rss_mb": baseline,
    }


def _run_worker(kind: str, shapes_file: Path, sites: int, workers: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--worker", kind, "--shapes", str(shapes_file)]
    command += ["--sites", str(sites), "--workers", str(workers)]
    done = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["small", "base"])
    parser.add_argument("--sites", nargs="+", type=int, default=[3, 5])
    parser.add_argument("--worker", choices=["plain", "secagg"])
    parser.add_argument("--shapes", type=Path)
    parser.add_argument("--workers", type=int, default=1, help="threads for SecAgg masking sweeps")
    args = parser.parse_args()
    if args.worker:
        shapes = json.loads(args.shapes.read_text())
        if args.worker == "plain":
            print(json.dumps(worker_plain(shapes, args.sites[0])))
        else:
            print(json.dumps(worker_secagg(shapes, args.sites[0], args.workers)))
        return

    columns = [
        ("arch", 6, "", "{:<6}"), ("sites", 5, "", "{:>5}"), ("values", 7, "(M)", "{:>7.1f}"),
        ("plain s", 8, "", "{:>8.2f}"), ("secagg s", 9, "(all)", "{:>9.2f}"),
        ("client s", 9, "(max)", "{:>9.2f}"), ("server s", 9, "", "{:>9.2f}"),
        ("time x", 7, "serial", "{:>7.2f}"), ("time x", 7, "par.", "{:>7.2f}"),
        ("plain MB", 9, "", "{:>9.0f}"), ("secagg MB", 9, "", "{:>9.0f}"), ("mem x", 6, "", "{:>6.2f}"),
        ("data x", 6, "", "{:>6.2f}"), ("max err", 8, "", "{:>8.1e}"),
    ]  # fmt: skip
    print(" ".join(f"{name:>{width}}" for name, width, _, _ in columns))
    print(" ".join(f"{unit:>{width}}" for _, width, unit, _ in columns))
    with tempfile.TemporaryDirectory() as folder:
        for arch in args.archs:
            shapes = encoder_shapes(arch)
            shapes_file = Path(folder) / f"{arch}.json"
            shapes_file.write_text(json.dumps(shapes))
            millions = sum(int(np.prod(s)) for s in shapes.values()) / 1e6
            for sites in args.sites:
                plain = _run_worker("plain", shapes_file, sites, args.workers)
                secure = _run_worker("secagg", shapes_file, sites, args.workers)
                serial = secure["seconds"] / plain["seconds"]
                parallel = (secure["client_max_seconds"] + secure["server_seconds"]) / plain["seconds"]
                memory = secure["peak_rss_mb"] / plain["peak_rss_mb"]
                data = (secure["peak_rss_mb"] - secure["baseline_rss_mb"]) / (
                    plain["peak_rss_mb"] - plain["baseline_rss_mb"]
                )
                row = [
                    arch, sites, millions, plain["seconds"], secure["seconds"], secure["client_max_seconds"],
                    secure["server_seconds"], serial, parallel, plain["peak_rss_mb"], secure["peak_rss_mb"],
                    memory, data, secure["max_abs_error"],
                ]  # fmt: skip
                print(
                    " ".join(fmt.format(v) for (_, _, _, fmt), v in zip(columns, row, strict=True)),
                    flush=True,
                )


if __name__ == "__main__":
    main()
