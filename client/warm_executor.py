"""A pre-warmed ClientApp executor: pay the torch/timm import once per SuperNode, not once per message.

Flower 1.42 runs every message in a fresh `flwr-clientapp` process (its `run_clientapp` handles one
task and exits), so each training round re-imports torch and timm (seconds per message). Flower
allows no process to serve two messages, but its SuperNode accepts an external executor
(`--isolation process`): this module is one. It imports the heavy third-party libraries once, then
polls the SuperNode's Runtime API for ClientApp tasks and forks a child per task that runs Flower's
own `run_clientapp`. Each message still gets a fresh process (isolation and crash containment stay
as in Flower); only the import cost is shared. The child drops this package's own modules first, so
the app code comes from the FAB the coordinator sent, not from what this parent had loaded.

Fork is POSIX-only, and the parent must not initialise CUDA (importing torch does not).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable, Sequence

logger = logging.getLogger(__name__)

# Third-party modules worth importing before the first task (missing ones are skipped).
DEFAULT_PREWARM = (
    "numpy",
    "torch",
    "torchvision",
    "timm",
    "PIL.Image",
    "safetensors.torch",
    "sklearn.metrics",
    "opacus",  # the ClientApp's DP-SGD path imports it (about 0.4 s per message otherwise)
    "flwr.clientapp",
    "flwr.app",
    "flwr.supernode.runtime.run_clientapp",
)
# Runtime API calls the SuperNode authenticates with the SuperExec secret (as Flower's own SuperExec signs).
AUTH_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask"})
# This distribution's top-level packages: a task must import them from its FAB, never from the parent.
FIRST_PARTY = ("client", "server", "visionfm_core", "strategies", "certs", "simulations")


def prewarm(modules: Iterable[str]) -> dict[str, float]:
    """Import `modules`; returns seconds per module actually imported."""
    took: dict[str, float] = {}
    for name in modules:
        started = time.perf_counter()
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        took[name] = time.perf_counter() - started
    return took


def forget_first_party(roots: Sequence[str] = FIRST_PARTY) -> int:
    """Remove first-party modules from sys.modules so the next import reads the FAB's copy."""
    names = [n for n in sys.modules if n.split(".", 1)[0] in roots]
    for name in names:
        del sys.modules[name]
    return len(names)


def _run_task(runtime_address: str, token: str) -> None:
    """Child process: behave exactly like `flwr-clientapp --insecure --token ...` (never returns)."""
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    forget_first_party()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        run_clientapp(
            runtime_api_address=runtime_address,
            token=token,
            insecure=True,
            certificates=None,
            parent_pid=os.getppid(),
            runtime_dependency_install=False,
        )
    finally:
        os._exit(1)  # run_clientapp exits itself; never fall back into the parent's loop


class WarmExecutor:
    """Poll the SuperNode for ClientApp tasks and fork a pre-warmed child for each."""

    def __init__(self, runtime_address: str, poll_s: float = 0.2, auth_secret: bytes | None = None) -> None:
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
        from flwr.supercore.protobuf.client import ProtobufClientInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        interceptors: list[ProtobufClientInterceptor] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if auth_secret:
            # The SuperNode hands tasks only to a caller that signs with the per-start secret (join writes it).
            interceptors.append(
                SuperExecAuthHttpInterceptor(master_secret=auth_secret, protected_methods=AUTH_METHODS)
            )

        self.runtime_address = runtime_address
        self.poll_s = poll_s
        self.children: set[int] = set()
        self.launched = 0
        self._stop = False
        self._client = RuntimeHttpClient.from_server_address(
            server_address=runtime_address,
            insecure=True,
            root_certificates=None,
            interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def stop(self, *_: object) -> None:
        self._stop = True

    def _reap(self) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done == 0:
                    continue
            self.children.discard(pid)

    def poll_once(self) -> bool:
        """Acquire at most one task and launch it; True when one was launched."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # type: ignore[attr-defined]
        from flwr.supercore.constant import TaskType

        response = self._client.AcquireTask(
            AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
        )
        if not (response.HasField("task") and response.token):
            return False
        pid = os.fork()
        if pid == 0:
            _run_task(self.runtime_address, response.token)
        self.children.add(pid)
        self.launched += 1
        return True

    def serve(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        try:
            while not self._stop:
                self._reap()
                if not self.poll_once():
                    time.sleep(self.poll_s)
        finally:
            for pid in self.children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            self._client.close()


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m client.warm_executor --runtime-api-address 127.0.0.1:PORT` (started by `join`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument(
        "--prewarm",
        default=",".join(DEFAULT_PREWARM),
        help="comma-separated modules to import before the first task",
    )
    parser.add_argument("--poll", type=float, default=0.2, help="seconds between task polls")
    parser.add_argument(
        "--superexec-auth-secret-file", default=None, help="the SuperNode's SuperExec secret (raw bytes)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s warm-executor: %(message)s",
                        force=True)  # opacus configures the root logger when it is imported
    logging.getLogger("httpx").setLevel(logging.WARNING)
    took = prewarm(m for m in args.prewarm.split(",") if m)
    logger.info("pre-imported %d modules in %.1fs", len(took), sum(took.values()))
    secret = None
    if args.superexec_auth_secret_file:
        with open(args.superexec_auth_secret_file, "rb") as handle:
            secret = handle.read()
    WarmExecutor(args.runtime_api_address, args.poll, secret).serve()


if __name__ == "__main__":
    main()
