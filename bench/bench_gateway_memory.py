"""Coordinator memory under three concurrent oversized requests from one authenticated hospital.

The finding this answers: three concurrent 900 MB requests raised the coordinator's memory by 9.4 GB,
never released. Now the gateway refuses a body beyond its bound (413; the declared length is checked
before reading, a streamed body is cut at the bound) and spools what it accepts to disk beyond 1 MiB.

    python bench/bench_gateway_memory.py            # real `visionfm-server start`, 3 x 900 MB, default bound
    python bench/bench_gateway_memory.py --smoke    # in-process gateway, 3 x 12 MiB against a 4 MiB bound

Prints the resident memory before, at the peak and after (the coordinator's whole process tree, or this
process with --smoke), the time until a valid request is served again, and `ratio` = memory growth at
the peak / bytes offered (the old gateway held every byte: a ratio of about 1 or more).
"""

from __future__ import annotations

import argparse
import base64
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from _bench import cpu_model

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

from certs.keys import load_openssh_public_key  # noqa: E402
from certs.provision import issue  # noqa: E402
from certs.store import CertStore  # noqa: E402
from certs.tls import client_context, server_context  # noqa: E402
from strategies.protocol.processes import descendants, free_port, stop_tree, wait_for_port  # noqa: E402

MIB = 1024 * 1024


def rss_mib(pid: int) -> float:
    total = 0
    for member in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def provision(folder: Path, port: int) -> CertStore:
    participants = folder / "participants.toml"
    participants.write_text(
        f'[federation]\nname = "bench"\n\n[coordinator]\naddress = "127.0.0.1:{port}"\n\n[[hospital]]\nname = "h"\n'
    )
    issue(participants, folder / "pki")
    return CertStore(folder / "pki")


def node_header(store: CertStore) -> dict[str, str]:
    public = load_openssh_public_key(store.hospital("h").node_pub)
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return {"flwr-public-key": base64.b64encode(pem).decode(), "content-type": "application/protobuf"}


def zeros(total: int, piece: int = MIB) -> Iterator[bytes]:
    block = b"\x00" * piece
    for _ in range(total // piece):
        yield block


def flood(store: CertStore, port: int, size: int, measure: Callable[[], float]) -> tuple[float, list[object]]:
    """Three concurrent requests of `size` bytes (one declaring its length, two streamed); peak memory."""
    bundle = store.bundle_dir("h")
    context = client_context(bundle / "ca.crt", bundle / "client.crt", bundle / "client.key")
    statuses: list[object] = []

    def send(declared: bool) -> None:
        headers = node_header(store)
        if declared:
            headers["content-length"] = str(size)
        with httpx.Client(verify=context, timeout=120) as client:
            try:
                response = client.post(f"https://127.0.0.1:{port}/v1/fleet/push-object", content=zeros(size),
                                       headers=headers)
                statuses.append(response.status_code)
            except httpx.HTTPError as exc:
                statuses.append(type(exc).__name__)  # cut off mid-upload after the refusal

    threads = [threading.Thread(target=send, args=(i == 0,)) for i in range(3)]
    for thread in threads:
        thread.start()
    peak = measure()
    while any(t.is_alive() for t in threads):
        peak = max(peak, measure())
        time.sleep(0.02)
    return peak, statuses


def recovery_s(store: CertStore, port: int) -> float:
    bundle = store.bundle_dir("h")
    context = client_context(bundle / "ca.crt", bundle / "client.crt", bundle / "client.key")
    started = time.monotonic()
    with httpx.Client(verify=context, timeout=30) as client:
        while client.get(f"https://127.0.0.1:{port}/v1/gateway/whoami").status_code != 200:
            time.sleep(0.05)
    return time.monotonic() - started


def stand_in_superlink(store: CertStore) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            remaining = int(self.headers.get("content-length", 0))
            while remaining > 0:
                remaining -= len(self.rfile.read(min(remaining, MIB)))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = server_context(store.server_cert, store.server_key).wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def run_in_process(folder: Path, bound_mib: int, size: int) -> tuple[float, float, float, list[object], float]:
    from server.ops.gateway import FleetGateway, GatewayConfig

    port = free_port()
    store = provision(folder, port)
    upstream = stand_in_superlink(store)
    config = GatewayConfig.from_store(store, "127.0.0.1", port, int(upstream.server_address[1]))
    config.max_body_bytes = bound_mib * MIB
    gateway = FleetGateway(config)
    gateway.start()
    try:
        recovery_s(store, port)  # warm up TLS and the upstream connection pool
        before = rss_mib(os.getpid())
        peak, statuses = flood(store, port, size, lambda: rss_mib(os.getpid()))
        recovered = recovery_s(store, port)
        after = rss_mib(os.getpid())
    finally:
        gateway.close()
        upstream.shutdown()
    return before, peak, after, statuses, recovered


def run_coordinator(folder: Path, bound_mib: int, size: int) -> tuple[float, float, float, list[object], float]:
    port = free_port()
    store = provision(folder, port)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "server.cli", "start", "--certs", str(store.root), "--state",
               str(folder / "state"), "--max-request-mb", str(bound_mib)]
    with (folder / "coordinator.log").open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if not wait_for_port("127.0.0.1", port, 180, process):
            raise SystemExit(f"the coordinator did not start; see {folder / 'coordinator.log'}")
        recovery_s(store, port)
        time.sleep(2.0)
        before = rss_mib(process.pid)
        peak, statuses = flood(store, port, size, lambda: rss_mib(process.pid))
        recovered = recovery_s(store, port)
        time.sleep(1.0)
        after = rss_mib(process.pid)
    finally:
        stop_tree(process)
    return before, peak, after, statuses, recovered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="in-process gateway, 3 x 12 MiB against a 4 MiB bound")
    parser.add_argument("--request-mb", type=int, default=900, help="size of each of the three requests (MB)")
    parser.add_argument("--bound-mib", type=int, default=32, help="the coordinator's --max-request-mb")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}")
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        if args.smoke:
            bound, size = 4, 12 * MIB
            before, peak, after, statuses, recovered = run_in_process(Path(tmp), bound, size)
            where = "this process (in-process gateway)"
        else:
            bound, size = args.bound_mib, args.request_mb * 1000 * 1000 // MIB * MIB
            before, peak, after, statuses, recovered = run_coordinator(Path(tmp), bound, size)
            where = "the coordinator's process tree (visionfm-server start, SuperLink and helpers)"
    offered = 3 * size / MIB
    print(f"3 concurrent requests of {size / MIB:.0f} MiB (bound {bound} MiB), answers {statuses}")
    print(f"resident memory of {where}: before {before:.0f} MiB, peak {peak:.0f} MiB, after {after:.0f} MiB")
    print(f"a valid request was served {recovered * 1000:.0f} ms after the flood")
    print(f"ratio (peak growth / bytes offered): {(peak - before) / offered:.4f} "
          f"({peak - before:.1f} MiB of {offered:.0f} MiB offered)")


if __name__ == "__main__":
    main()
