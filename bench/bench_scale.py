"""Many simulated hospitals on one machine: wall time and peak memory of `visionfm simulate` as the number
of sites grows while each round samples the same number of them.

Runs `visionfm simulate` in a subprocess on a fundus-only scenario with N sites (iid shares of the bundled
RetinaMNIST pool, nano ViT, 1 local step), `--fraction-train` chosen so that each round trains
`--per-round` sites (and evaluates `--eval-per-round`), and samples every 0.25 s the resident memory of
the whole process tree (the driver, Ray's GCS and raylet, every worker) from /proc, and the machine's used
memory. From the run's metrics: the coordinator's peak resident memory, the mean round time and the
sites each round sampled. Printed per N, then the ratios largest N / smallest N of round time and
coordinator peak memory (targets: round time ~1 with the same sampled sites, memory flat).

--smoke runs no simulation: it times and sizes the coordinator's per-round sampling over 100 and 1,000
connected sites (what the full run's ratios rest on), in well under a second.

Usage: python bench/bench_scale.py [--sites 100 1000] [--per-round 50] [--rounds 3] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import cpu_model

PAGE = os.sysconf("SC_PAGE_SIZE")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(parent, []).append(int(entry))
    return tree


def tree_rss_bytes(root: int) -> int:
    """Resident bytes of `root` and all its descendants."""
    tree, total, todo = _children(), 0, [root]
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        todo.extend(tree.get(pid, []))
    return total


def machine_used_bytes() -> int:
    info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()}
    return info["MemTotal"] - info["MemAvailable"]


SCENARIO = """name = "scale"
description = "many fundus sites, iid shares of RetinaMNIST, nano ViT"
sites = {sites}

[datasets]
fundus = "retinamnist"

[partition]
kind = "iid"
seed = 0

[run]
local-steps = 1
batch-size = 8
arch = "nano"
image-size = 32
patch-size = 8
knn-k = 5
objective = "dino"
"ssl.out-dim" = 64
"ssl.head-hidden-dim" = 32
"ssl.head-bottleneck-dim" = 16
"ssl.local-crops" = 2
"""


def run(sites: int, rounds: int, per_round: int, eval_per_round: int, out: Path) -> dict[str, float]:
    idle = machine_used_bytes()
    out.mkdir(parents=True, exist_ok=True)
    scenario = out / "scale.toml"
    scenario.write_text(SCENARIO.format(sites=sites))
    command = [sys.executable, "-m", "simulations.cli", "simulate", "--scenario", str(scenario),
               "--rounds", str(rounds), "--out", str(out / "run"),
               "--fraction-train", repr(per_round / sites), "--fraction-evaluate", repr(eval_per_round / sites)]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak_tree = peak_machine = 0
    while proc.poll() is None:
        peak_tree = max(peak_tree, tree_rss_bytes(proc.pid))
        peak_machine = max(peak_machine, machine_used_bytes() - idle)
        time.sleep(0.25)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"simulate with {sites} sites failed (exit {proc.returncode}); see {out}")
    rows = json.loads((out / "run" / "metrics.json").read_text())
    trained = [{r["site"] for r in rows if r["phase"] == "train" and r["round"] == k} for k in range(1, rounds + 1)]
    timing = [r["round_seconds"] for r in rows if r["phase"] == "timing"]
    coordinator = [r["peak_rss_mb"] for r in rows if r["phase"] == "memory" and r["site"] == "coordinator"]
    site_memory = [r["rss_mb"] for r in rows if r["phase"] == "memory" and r["site"] != "coordinator"]
    return {"sites": sites, "wall_s": wall, "rounds": len([t for t in trained if t]),
            "sampled_per_round": sum(len(t) for t in trained) / max(len(trained), 1),
            "round_s": sum(timing) / max(len(timing), 1), "coordinator_peak_mb": max(coordinator, default=0.0),
            "site_max_mb": max(site_memory, default=0.0),
            "peak_tree_gb": peak_tree / 2**30, "peak_machine_gb": peak_machine / 2**30}


def smoke() -> None:
    """The coordinator's per-round work on the number of sites: sampling 50 of N connected node ids."""
    import tracemalloc

    from server.federation.sampling import sample_sites

    costs = {}
    sample_sites(list(range(10)), 0.5, 1, seed=0, server_round=1)  # warm: NumPy's generator set-up, imports
    for sites in (100, 1000):
        nodes = list(range(10_000, 10_000 + sites))
        tracemalloc.start()
        started = time.perf_counter()
        for server_round in range(1, 21):
            sample_sites(nodes, 50 / sites, 1, seed=0, server_round=server_round)
        seconds = (time.perf_counter() - started) / 20
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        costs[sites] = (seconds, peak)
        print(f"{sites:>5} connected sites: sampling 50 takes {seconds * 1e6:.0f} us, peak {peak / 1024:.0f} KiB")
    print(f"ratio 1000/100 sites: sampling time {costs[1000][0] / costs[100][0]:.2f}, "
          f"memory {costs[1000][1] / max(costs[100][1], 1):.2f} (smoke: no simulation run)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--per-round", type=int, default=50, help="sites each round trains")
    parser.add_argument("--eval-per-round", type=int, default=5, help="sites each round evaluates")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="the coordinator's sampling only, no simulation")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}; {os.cpu_count()} CPUs, {machine_used_bytes() / 2**30:.1f} GB in use before, "
          f"load {os.getloadavg()[0]:.1f}")
    if args.smoke:
        smoke()
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="vfm-scale-") as tmp:
        for sites in args.sites:
            r = run(sites, args.rounds, args.per_round, args.eval_per_round, Path(tmp) / f"sites-{sites}")
            results.append(r)
            print(f"{sites:>5} sites: {r['wall_s']:6.0f} s wall, {r['rounds']} rounds of {r['sampled_per_round']:.0f} "
                  f"sampled sites, {r['round_s']:.1f} s per round, coordinator peak {r['coordinator_peak_mb']:.0f} MB, "
                  f"largest site worker {r['site_max_mb']:.0f} MB, process tree peak {r['peak_tree_gb']:.2f} GB, "
                  f"machine +{r['peak_machine_gb']:.2f} GB", flush=True)
    first, last = results[0], results[-1]
    print(f"ratio {last['sites']}/{first['sites']} sites: round time {last['round_s'] / first['round_s']:.2f}, "
          f"wall {last['wall_s'] / first['wall_s']:.2f}, coordinator peak memory "
          f"{last['coordinator_peak_mb'] / first['coordinator_peak_mb']:.2f}, process tree peak "
          f"{last['peak_tree_gb'] / first['peak_tree_gb']:.2f}")


if __name__ == "__main__":
    main()
