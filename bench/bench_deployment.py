"""Round time on loopback minus the sites' local compute, as a share of the round: the cost of the
deployment itself (TLS through gateway and uplinks, Flower's polling and object transfer, ClientApp
process start-up, aggregation), with and without the pre-warmed ClientApp executor, in the same run.

Real processes as in production: `visionfm-server start`, N x `visionfm-client join` (warm, then
`--cold`, which is stock Flower: a fresh `flwr-clientapp` process per message), the real ServerApp and
ClientApp (the deployment app). Per round, the ServerApp's own `timing` row (metrics.json) gives the
round time (global model sent to all sites -> every reply folded in) and each site's local compute
(the time its train handler worked: data, training, packing; reported as `compute-seconds`); overhead =
round time minus the slowest site's compute. The wall time between round checkpoints (which adds
evaluation, when a round has one, and the checkpoint write) is printed beside it.

    python bench/bench_deployment.py      # the target: ViT-S/16, 224 px, 200 images/site, 3 sites
    python bench/bench_deployment.py --local-steps 2 --batch-size 16 --threads 1 --rounds 2   # CPU-sized
    python bench/bench_deployment.py --arch nano --image-size 32 --patch-size 8 --images-per-site 64  # quick

Prints one line per mode and round, then each mode's mean overhead share (target: warm under 20%) and
the cold/warm ratio of mean round times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _bench import add_smoke_flag, print_cpu

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

def _wait(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


def _site_data(folder: Path, sites: int, images: int) -> list[Path]:
    import numpy as np

    source = REPO / "simulations" / "data" / "retinamnist" / "retinamnist.npz"
    paths = []
    with np.load(source) as data:
        for i in range(sites):
            part = slice(i * images, (i + 1) * images)
            val = slice(i * 16, (i + 1) * 16)
            path = folder / f"site-{i}.npz"
            np.savez(
                path,
                train_images=data["train_images"][part],
                train_labels=data["train_labels"][part],
                val_images=data["val_images"][val],
                val_labels=data["val_labels"][val],
            )
            paths.append(path)
    return paths


def _job(folder: Path, args: argparse.Namespace) -> Path:
    """The job: the default deployment app (the installed ServerApp and ClientApp)."""
    job = folder / "job.toml"
    job.write_text(
        f'[job]\nname = "bench"\nmodalities = ["fundus"]\nrounds = {args.rounds}\n'
        f"min-sites = {args.sites}\nround-timeout = {args.round_timeout}\n\n[run-config]\n"
        f'arch = "{args.arch}"\nimage-size = {args.image_size}\npatch-size = {args.patch_size}\n'
        f"local-steps = {args.local_steps}\nbatch-size = {args.batch_size}\nknn-k = 5\n"
        f"eval-every = {args.rounds + 1}\nclient-threads = {args.threads}\n"
    )
    return job


def run_mode(mode: str, args: argparse.Namespace, root: Path) -> list[dict[str, float]]:
    """One federation with `mode` ("warm" or "cold"); per measured round: round, overhead, compute."""
    from certs.provision import issue
    from strategies.protocol.processes import free_port, stop_tree

    folder = root / mode
    folder.mkdir()
    port = free_port()
    names = [f"site-{i}" for i in range(args.sites)]
    participants = folder / "participants.toml"
    participants.write_text(
        f'[federation]\nname = "bench"\n[coordinator]\naddress = "127.0.0.1:{port}"\n'
        + "".join(f'[[hospital]]\nname = "{n}"\n' for n in names)
    )
    issue(participants, folder / "pki")
    data = _site_data(folder, args.sites, args.images)
    py = sys.executable
    logs = folder / "logs"
    logs.mkdir()
    started: list[subprocess.Popen[bytes]] = []

    def launch(argv: list[str], log: str) -> subprocess.Popen[bytes]:
        with (logs / log).open("wb") as out:
            proc = subprocess.Popen([py, *argv], stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        started.append(proc)
        return proc

    state = folder / "coordinator"
    try:
        launch(["-m", "server.cli", "start", "--certs", str(folder / "pki"), "--state", str(state)], "coord.log")
        _wait(lambda: (state / "coordinator.json").exists(), 120, "the coordinator")
        for name, path in zip(names, data, strict=True):
            extra = ["--cold"] if mode == "cold" else []
            launch(
                [
                    "-m",
                    "client.cli",
                    "join",
                    "--bundle",
                    str(folder / "pki" / "bundles" / name),
                    "--data",
                    str(path),
                    "--modalities",
                    "fundus",
                    "--work",
                    str(folder / name),
                    "--gpu",
                    str(args.gpu),
                    *extra,
                ],
                f"{name}.log",
            )
        job = _job(folder, args)
        result = subprocess.run(
            [py, "-m", "server.cli", "run", str(job), "--state", str(state)],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=False,
            timeout=(args.rounds + 2) * args.round_timeout + 600,
        )
        if result.returncode != 0:
            raise RuntimeError(result.stdout + result.stderr)
    finally:
        for proc in reversed(started):
            stop_tree(proc)
    return _rounds(state / "runs" / "bench", args.rounds, [folder / n for n in names])


def _train_replies(site: Path, server_round: int) -> list[dict[str, Any]]:
    """The site's audit entries of its training replies of `server_round` (end time, handler seconds)."""
    entries = [json.loads(line) for line in (site / "audit.jsonl").read_text().splitlines()]
    return [
        e for e in entries
        if e.get("event") == "reply" and e.get("round") == server_round and "train" in str(e.get("message_type"))
    ]


def _rounds(out: Path, rounds: int, sites: list[Path]) -> list[dict[str, float]]:
    """Per round: the ServerApp's timing row, the wall time between checkpoints, and (from the sites'
    audit logs) how long the global model took to reach the slowest site's train handler and how long
    the last reply took from leaving its handler to being folded in."""
    rows = json.loads((out / "metrics.json").read_text())
    timing = {int(r["round"]): r for r in rows if r["phase"] == "timing"}
    marker = {k: (out / "checkpoints" / f"round-{k:04d}" / "round.json").stat().st_mtime for k in range(rounds + 1)}
    measured = []
    for k in range(1, rounds + 1):
        row = timing[k]
        if int(row["sites_timed"]) != len(sites):
            print(f"# round {k}: only {int(row['sites_timed'])} of {len(sites)} sites reported their compute time")
        # The round's clock starts right after the previous checkpoint is written.
        started, ended = marker[k - 1], marker[k - 1] + float(row["round_seconds"])
        replies = [e for site in sites for e in _train_replies(site, k)]
        measured.append(
            {
                "round": k,
                "round_s": float(row["round_seconds"]),
                "compute_s": float(row["slowest_site_seconds"]),
                "overhead_s": float(row["overhead_seconds"]),
                "share": float(row["overhead_share"]),
                "wall_s": marker[k] - marker[k - 1],
                "to_site_s": max((e["time"] - e["seconds"] - started for e in replies), default=float("nan")),
                "back_s": max((ended - e["time"] for e in replies), default=float("nan")),
            }
        )
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="small")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", "--patch", type=int, default=16)
    parser.add_argument(
        "--images-per-site", "--images", dest="images", type=int, default=200, help="training images per site"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--local-steps", type=int, default=0, help="default: one pass over the images")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="rounds measured (round 0 and the last also evaluate)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per site (0: torch's choice)")
    parser.add_argument("--gpu", type=int, default=-1, help="GPU index for every site (-1: CPU)")
    parser.add_argument("--modes", default="warm,cold")
    parser.add_argument(
        "--round-timeout", type=int, default=600, help="seconds a round (or evaluation) waits for the sites"
    )
    add_smoke_flag(parser)
    args = parser.parse_args()
    if args.smoke:  # the smallest real deployment: coordinator, two hospitals over TLS, one warm round
        args.arch, args.image_size, args.patch_size, args.images, args.batch_size = "nano", 32, 8, 8, 4
        args.sites, args.rounds, args.modes, args.round_timeout = 2, 1, "warm", 120
    print_cpu()
    if args.local_steps <= 0:
        args.local_steps = max(1, args.images // args.batch_size)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    print(
        f"# {args.sites} sites x {args.images} images, {args.arch}/{args.patch_size} at {args.image_size} px, "
        f"{args.local_steps} local steps of {args.batch_size}, {args.rounds} rounds"
    )
    summary = {}
    with tempfile.TemporaryDirectory(prefix="vfm-bench-") as tmp:
        for mode in args.modes.split(","):
            rows = run_mode(mode, args, Path(tmp))
            for row in rows:
                print(
                    f"{mode:5} round {row['round']}: round {row['round_s']:6.1f}s  slowest site's compute "
                    f"{row['compute_s']:6.1f}s  overhead {row['overhead_s']:6.1f}s  ({row['share']:.0%})  "
                    f"[model to the last handler {row['to_site_s']:5.1f}s, last reply back {row['back_s']:5.1f}s; "
                    f"checkpoint to checkpoint {row['wall_s']:6.1f}s]"
                )
            summary[mode] = (statistics.mean(r["round_s"] for r in rows), statistics.mean(r["share"] for r in rows))
    for mode, (round_s, share) in summary.items():
        print(f"{mode}: mean round {round_s:.1f}s, overhead share {share:.0%} (target < 20%), "
              f"ratio overhead / round time {share:.2f}")
    if "warm" in summary and "cold" in summary:
        print(f"cold/warm round time ratio: {summary['cold'][0] / summary['warm'][0]:.2f}")


if __name__ == "__main__":
    main()
