"""Round time on loopback minus the sites' local compute, as a share of the round: the cost of the
deployment itself (TLS through gateway and uplinks, Flower's polling, process start-up, aggregation,
checkpoints), with and without the pre-warmed ClientApp executor, measured in the same run.

Real processes as in production: `visionfm-server start`, N x `visionfm-client join` (warm, then
`--cold`, which is stock Flower: a fresh `flwr-clientapp` process per message), the real ServerApp and
ClientApp. Local compute per site and round is the time the ClientApp spent inside its train handler
(from the sites' audit logs: the bench's app lists the audit mod); the round time is the gap between
consecutive round checkpoints on the coordinator. Rounds that also evaluate are left out.

    python bench/bench_deployment.py                       # the target: ViT-S/16, 224 px, 200 images/site
    python bench/bench_deployment.py --arch nano --image-size 32 --patch-size 8 --images 64   # CPU quick look

Prints one line per mode and round, then the overhead share of each mode (target: warm under 20%) and
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

AUDITED_CLIENT = '''"""The real ClientApp's handlers behind the audit mod (which also times each message)."""
from flwr.clientapp import ClientApp

from client.app import evaluate, train
from client.audit import audit_mod

app = ClientApp(mods=[audit_mod])
app.train()(train)
app.evaluate()(evaluate)
'''


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


def _app(folder: Path) -> Path:
    from server.deploy_app import write_deployment_app

    app = write_deployment_app(folder)
    text = (
        (app / "pyproject.toml").read_text().replace('clientapp = "client.app:app"', 'clientapp = "bench_client:app"')
    )
    (app / "pyproject.toml").write_text(text)
    (app / "bench_client.py").write_text(AUDITED_CLIENT)
    return app


def _job(folder: Path, app: Path, args: argparse.Namespace) -> Path:
    job = folder / "job.toml"
    job.write_text(
        f'[job]\nname = "bench"\napp = "{app}"\nmodalities = ["fundus"]\nrounds = {args.rounds}\n'
        f"min-sites = {args.sites}\nround-timeout = 3600\n\n[run-config]\n"
        f'arch = "{args.arch}"\nimage-size = {args.image_size}\npatch-size = {args.patch_size}\n'
        f"local-steps = {args.local_steps}\nbatch-size = {args.batch_size}\nknn-k = 5\n"
        f"eval-every = {args.rounds + 1}\nclient-threads = {args.threads}\n"
    )
    return job


def run_mode(mode: str, args: argparse.Namespace, root: Path) -> list[dict[str, float]]:
    """One federation with `mode` ("warm" or "cold"); per measured round: round, overhead, compute."""
    from certs.provision import issue
    from server.processes import free_port, stop_tree

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
        job = _job(folder, _app(folder / "app"), args)
        result = subprocess.run(
            [py, "-m", "server.cli", "run", str(job), "--state", str(state)],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(result.stdout + result.stderr)
    finally:
        for proc in reversed(started):
            stop_tree(proc)
    return _rounds(state / "runs" / "bench", [folder / n for n in names], args.rounds)


def _rounds(out: Path, sites: list[Path], rounds: int) -> list[dict[str, float]]:
    marker = {k: (out / "checkpoints" / f"round-{k:04d}" / "round.json").stat().st_mtime for k in range(rounds + 1)}
    compute: dict[int, list[float]] = {}
    for site in sites:
        for line in (site / "audit.jsonl").read_text().splitlines():
            entry = json.loads(line)
            if entry.get("event") == "reply" and "train" in str(entry.get("message_type")):
                compute.setdefault(int(entry["round"]), []).append(float(entry["seconds"]))
    rows = []
    for k in range(1, rounds):  # the last round also evaluates: left out
        round_s = marker[k] - marker[k - 1]
        slowest = max(compute.get(k, [0.0]))
        rows.append(
            {
                "round": k,
                "round_s": round_s,
                "compute_s": slowest,
                "overhead_s": round_s - slowest,
                "share": (round_s - slowest) / round_s,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="small")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--images", type=int, default=200, help="training images per site")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--local-steps", type=int, default=0, help="default: one pass over the images")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="rounds 1..R-1 are measured")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per site (0: torch's choice)")
    parser.add_argument("--gpu", type=int, default=-1, help="GPU index for every site (-1: CPU)")
    parser.add_argument("--modes", default="warm,cold")
    args = parser.parse_args()
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
                    f"{mode:5} round {row['round']}: round {row['round_s']:6.1f}s  local compute "
                    f"{row['compute_s']:6.1f}s  overhead {row['overhead_s']:6.1f}s  ({row['share']:.0%})"
                )
            summary[mode] = (statistics.mean(r["round_s"] for r in rows), statistics.mean(r["share"] for r in rows))
    for mode, (round_s, share) in summary.items():
        print(f"{mode}: mean round {round_s:.1f}s, overhead share {share:.0%} (target < 20%)")
    if "warm" in summary and "cold" in summary:
        print(f"cold/warm round time ratio: {summary['cold'][0] / summary['warm'][0]:.2f}")


if __name__ == "__main__":
    main()
