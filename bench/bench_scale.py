"""Many simulated hospitals on one machine: wall time and peak memory of `visionfm simulate`.

Runs `visionfm simulate --scenario quick --sites N --rounds R` in a subprocess (nano ViT, a few
RetinaMNIST/OCT images per site) and samples, every 0.25 s, the resident memory of the whole process
tree (the driver, Ray's GCS and raylet, every worker) read from /proc, plus the machine's used memory.
Printed per N: wall time, rounds completed, sites that trained in every round, peak tree RSS, peak
machine memory in use above the idle level measured just before.

Usage: python bench/bench_scale.py [--sites 10 100] [--rounds 3]
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


def run(sites: int, rounds: int, out: Path) -> dict[str, float]:
    idle = machine_used_bytes()
    command = [sys.executable, "-m", "simulations.cli", "simulate", "--scenario", "quick", "--sites", str(sites),
               "--rounds", str(rounds), "--out", str(out)]
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
    rows = json.loads((out / "metrics.json").read_text())
    trained = [{r["site"] for r in rows if r["phase"] == "train" and r["round"] == k} for k in range(1, rounds + 1)]
    return {"sites": sites, "wall_s": wall, "rounds": len([t for t in trained if t]),
            "sites_every_round": len(set.intersection(*trained)) if trained else 0,
            "peak_tree_gb": peak_tree / 2**30, "peak_machine_gb": peak_machine / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, {machine_used_bytes() / 2**30:.1f} GB in use before, load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="vfm-scale-") as tmp:
        for sites in args.sites:
            r = run(sites, args.rounds, Path(tmp) / f"sites-{sites}")
            print(f"{sites:>4} sites: {r['wall_s']:6.0f} s wall, {r['rounds']} rounds, {r['sites_every_round']} sites "
                  f"trained every round, peak RSS of the process tree {r['peak_tree_gb']:.2f} GB, machine "
                  f"+{r['peak_machine_gb']:.2f} GB", flush=True)


if __name__ == "__main__":
    main()
