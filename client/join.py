"""`visionfm-client join`: keep this site in the federation until told to stop.

It checks the bundle and asks the coordinator's gateway whether it accepts this site (a refused,
expired, revoked or foreign certificate fails here, with the reason, before anything starts; an
unreachable coordinator is asked again with backoff); then it runs the uplink, the SuperNode and (by
default) the pre-warmed executor. Network blips and coordinator restarts are absorbed by the
SuperNode's own retries through the uplink (Flower retries without limit); if the SuperNode exits
anyway, it is started again with backoff, unless the coordinator now refuses the site. By default a
site keeps trying forever; `max_offline_s` bounds how long it may stay cut off before `join` gives up.
A SuperNode that exits before it was ever activated while the coordinator accepts the site cannot
start here (bad option, unreadable file): `join` stops with the SuperNode's own error.

Its processes run under watchdogs (strategies/protocol/processes.py) and die with `join`, `kill -9` included; a
lock on the work folder keeps a second `join` off it, and a start after a crash first stops what the
crashed one left behind.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from certs.bundle import HospitalBundle, load_bundle
from certs.loopback import make_loopback_tls
from certs.tls import server_context
from certs.verify import has_errors, verify_bundle
from client.audit import AuditLog
from client.node_keys import AUDIT_LOG_KEY, LEDGER_DIR_KEY, STATE_DIR_KEY
from client.supernode import (
    NodeValue,
    SuperNodeSpec,
    deactivate_node,
    start_supernode,
    start_warm_executor,
    write_superexec_secret,
)
from client.supernode_poll import DEFAULT_IDLE_POLL_S
from client.uplink import Uplink, UplinkThread, probe_coordinator
from strategies.protocol.processes import FolderLock, descendants, free_port, stop_stale, stop_tree
from visionfm_core.errors import ConfigError, VisionFMError
from visionfm_core.modalities import canonical_modality

logger = logging.getLogger(__name__)


class JoinRefusedError(VisionFMError):
    """The site cannot join: bad bundle, or the coordinator refuses it. The message says why."""


class SiteOfflineError(JoinRefusedError):
    """The coordinator stayed unreachable for longer than the site's `max_offline_s`."""


@dataclass
class SiteSettings:
    """What `join` needs to know about this site (node config values stay on the site)."""

    bundle_dir: Path
    data_path: Path
    modalities: list[str]
    work_dir: Path
    gpu: int | None = None
    coordinator: str | None = None
    warm: bool = True
    extra_node_config: dict[str, NodeValue] = field(default_factory=dict)
    # How long the coordinator may stay unreachable before `join` gives up (0: keep trying forever).
    max_offline_s: float = 0.0
    # Seconds between the SuperNode's pulls that find no message (client/supernode_poll.py).
    idle_poll_s: float = DEFAULT_IDLE_POLL_S

    @property
    def audit_log(self) -> Path:
        return self.work_dir / "audit.jsonl"

    def node_config(self) -> dict[str, NodeValue]:
        values: dict[str, NodeValue] = {
            "data-path": str(self.data_path.resolve()),
            "modalities": ",".join(canonical_modality(m) for m in self.modalities),
            AUDIT_LOG_KEY: str(self.audit_log.resolve()),
            # Between-round SSL state on the site's disk, not in Flower's context (see client/site_state.py).
            STATE_DIR_KEY: str((self.work_dir / "state").resolve()),
            # The lifetime privacy ledger: in the work folder, never in a run's state (client/privacy/ledger.py).
            LEDGER_DIR_KEY: str((self.work_dir / "privacy").resolve()),
        }
        if self.gpu is not None:
            values["gpu"] = self.gpu
        values.update(self.extra_node_config)
        return values


def admit(
    settings: SiteSettings, stop: threading.Event | None = None, max_backoff_s: float = 60.0
) -> HospitalBundle | None:
    """Load and verify the bundle, then ask the coordinator until it answers.

    JoinRefusedError with the reason when the bundle is unusable or the coordinator refuses the site;
    an unreachable coordinator is asked again with backoff (SiteOfflineError once `max_offline_s` has
    passed, when set). Returns None when `stop` is set while waiting.
    """
    try:
        bundle = load_bundle(settings.bundle_dir)
    except VisionFMError as exc:
        raise JoinRefusedError(str(exc)) from exc
    findings = verify_bundle(bundle.root, expected_address=None)
    if has_errors(findings):
        raise JoinRefusedError("bundle is not usable:\n" + "\n".join(str(f) for f in findings if f.level == "error"))
    stop = stop or threading.Event()  # never set: wait out the backoff
    started = time.monotonic()
    backoff = 1.0
    while True:
        probe = probe_coordinator(bundle, settings.coordinator)
        if probe.ok:
            return bundle
        if probe.refused:
            raise JoinRefusedError(probe.message)
        waited = time.monotonic() - started
        if settings.max_offline_s > 0 and waited + backoff > settings.max_offline_s:
            raise SiteOfflineError(
                f"{probe.message}; gave up after {waited:.0f}s (max offline {settings.max_offline_s:g}s)"
            )
        logger.warning("%s; asking again in %.0fs", probe.message, backoff)
        if stop.wait(backoff):
            return None
        backoff = min(backoff * 2, max_backoff_s)


INIT_FAILURE = "Failed to initialize the connection to the SuperLink"
NODE_ID_LINE = re.compile(r"SuperNode ID: (\d+)")


# How Flower words an answer from the SuperLink (as opposed to a transport error, which is retried).
SUPERLINK_ANSWER = re.compile(r"\[code: \d+\]|\b40[13]\b")


def refusal_in_log(text: str) -> str | None:
    """The SuperLink's reason when it refused a SuperNode's activation (Flower logs it, then exits).

    None for any other ending, a network failure during activation included: Flower gives up on
    errors whose text mentions TLS, which a connection cut mid-handshake can produce, and that is a
    blip to retry, not a refusal.
    """
    if INIT_FAILURE not in text:
        return None
    lines = text[text.index(INIT_FAILURE) :].splitlines()
    reason = " ".join(line.strip() for line in lines[1:3] if line.strip() and not line.startswith("For more"))
    if not SUPERLINK_ANSWER.search(reason):
        return None
    hint = ""
    if "2004" in reason or "activate" in reason.lower():
        hint = " (the coordinator does not know this site's node key: not registered, or revoked)"
    return f"the coordinator's SuperLink refused this site: {reason}{hint}"


EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b[^:]*: ")


def startup_error(text: str, lines: int = 4) -> str:
    """The SuperNode's own words when it could not start: the exception it ended with and the errors
    it logged, else the last lines it logged."""
    logged = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in logged if EXCEPTION_LINE.match(line) or "ERROR" in line]
    return "\n".join((errors or logged)[-lines:]) or "(the SuperNode logged nothing)"


class SiteNode:
    """The running parts of a joined site: uplink thread, SuperNode, executor."""

    def __init__(self, settings: SiteSettings, bundle: HospitalBundle) -> None:
        if not settings.modalities:
            raise ConfigError("modalities", "name at least one modality this site holds")
        self.settings = settings
        self.bundle = bundle
        settings.work_dir.mkdir(parents=True, exist_ok=True)
        self.lock = FolderLock(settings.work_dir, "join.lock", "visionfm-client join").acquire()
        stale = stop_stale(settings.work_dir)
        if stale:
            logger.warning("stopped %d process(es) left by a previous join on %s", len(stale), settings.work_dir)
        self.audit = AuditLog(settings.audit_log)
        self.loopback = make_loopback_tls(settings.work_dir / "tls")
        self.superexec_secret = write_superexec_secret(settings.work_dir / "tls")
        uplink = Uplink(
            bundle,
            server_context(self.loopback.cert, self.loopback.key),
            settings.coordinator,
            local_peers=lambda: [os.getpid(), *descendants(os.getpid())],
        )
        self.uplink = UplinkThread(uplink)
        self.supernode: subprocess.Popen[bytes] | None = None
        self.executor: subprocess.Popen[bytes] | None = None
        self._reported_out = 0
        self._log_offset = 0
        self.restarts = 0
        self.cleared_stale = False
        self._id_recorded = False

    def start_uplink(self) -> int:
        return self.uplink.start()

    @property
    def supernode_log(self) -> Path:
        return self.settings.work_dir / "logs" / "supernode.log"

    @property
    def node_id_file(self) -> Path:
        return self.settings.work_dir / "node-id"

    def _new_log_text(self) -> str:
        if not self.supernode_log.exists():
            return ""
        with self.supernode_log.open("rb") as handle:
            handle.seek(self._log_offset)
            return handle.read().decode(errors="replace")

    def remember_node_id(self) -> bool:
        """Keep the SuperLink's id for this site once the SuperNode is activated (for crash recovery).

        True the first time the current SuperNode is seen activated."""
        if self._id_recorded:
            return False
        match = NODE_ID_LINE.search(self._new_log_text())
        if match is None:
            return False
        self.node_id_file.write_text(match[1])
        self._id_recorded = True
        return True

    def start_node(self) -> None:
        self._log_offset = self.supernode_log.stat().st_size if self.supernode_log.exists() else 0
        self._id_recorded = False
        spec = SuperNodeSpec(
            bundle=self.bundle,
            loopback=self.loopback,
            uplink_port=self.uplink.uplink.listen_port,
            runtime_port=free_port(),
            node_config=self.settings.node_config(),
            work_dir=self.settings.work_dir,
            warm=self.settings.warm,
            gpu=self.settings.gpu,
            superexec_secret=self.superexec_secret,
            devices=int(str(self.settings.extra_node_config.get("devices", 1))),
            idle_poll_s=self.settings.idle_poll_s,
        )
        if self.node_id_file.exists():
            # A previous SuperNode of this site may have died without deactivating (crash, kill -9):
            # its activation would block ours until its heartbeat expires.
            self.cleared_stale = deactivate_node(spec, int(self.node_id_file.read_text()))
        self.supernode = start_supernode(spec)
        self.executor = start_warm_executor(spec)

    def stop_node(self) -> None:
        for process in (self.executor, self.supernode):
            if process is not None:
                stop_tree(process)
        self.executor = self.supernode = None

    @property
    def activated(self) -> bool:
        """Whether the current SuperNode was seen activated by the coordinator."""
        return self._id_recorded

    def startup_error(self) -> str:
        return startup_error(self._new_log_text())

    def refusal(self) -> str | None:
        """Why the SuperLink refused the last SuperNode, if that is how it ended."""
        return refusal_in_log(self._new_log_text())

    def node_exited(self) -> int | None:
        if self.supernode is None:
            return None
        code = self.supernode.poll()
        if code is None and self.executor is not None and self.executor.poll() is not None:
            return -1  # the executor died: restart both
        return code

    def check_offline(self) -> None:
        """SiteOfflineError when the uplink has failed to reach the coordinator for longer than allowed."""
        limit = self.settings.max_offline_s
        counters = self.uplink.uplink.counters
        if limit > 0 and counters.failures_in_a_row > 0 and counters.offline_s() > limit:
            raise SiteOfflineError(
                f"the coordinator has been unreachable for {counters.offline_s():.0f}s "
                f"(max offline {limit:g}s): {counters.last_error}"
            )

    def log_transport(self) -> None:
        """Append the bytes sent since the last entry (never contents or addresses)."""
        counters = self.uplink.uplink.counters
        if counters.bytes_out > self._reported_out:
            self.audit.append(
                "transport",
                bytes_out=counters.bytes_out - self._reported_out,
                connections=counters.connections,
            )
            self._reported_out = counters.bytes_out

    def close(self) -> None:
        self.stop_node()
        self.log_transport()
        self.uplink.stop()
        self.lock.release()


def run_site(
    settings: SiteSettings,
    stop: threading.Event,
    on_ready: Callable[[SiteNode], None] | None = None,
    poll_s: float = 0.5,
    transport_every_s: float = 60.0,
    max_backoff_s: float = 60.0,
) -> int:
    """Join and keep the site joined until `stop` is set. Returns 0, or raises JoinRefusedError
    (SiteOfflineError when the coordinator stayed unreachable longer than `settings.max_offline_s`)."""
    bundle = admit(settings, stop, max_backoff_s)
    if bundle is None:
        return 0
    try:
        node = SiteNode(settings, bundle)
    except RuntimeError as exc:  # another join holds the work folder
        raise JoinRefusedError(str(exc)) from exc
    node.start_uplink()
    node.audit.append("session", state="start", federation=bundle.federation, warm=settings.warm)
    backoff = 1.0
    last_transport = time.monotonic()
    try:
        node.start_node()
        if on_ready is not None:
            on_ready(node)
        while not stop.wait(poll_s):
            if time.monotonic() - last_transport > transport_every_s:
                node.log_transport()
                last_transport = time.monotonic()
            node.check_offline()
            code = node.node_exited()
            if code is None:
                if node.remember_node_id():
                    logger.info("joined: the coordinator activated this site's SuperNode")
                    backoff = 1.0  # activated: the next failure starts from a short wait again
                continue
            logger.warning("SuperNode exited (code %s); checking with the coordinator", code)
            activated = node.activated or node.remember_node_id()
            node.stop_node()
            refusal = node.refusal()
            if refusal is not None:
                raise JoinRefusedError(refusal)
            probe = probe_coordinator(bundle, settings.coordinator)
            if probe.refused:
                raise JoinRefusedError(probe.message)
            if probe.ok:
                node.uplink.uplink.counters.last_contact = time.monotonic()
                if not activated and code is not None and code > 0:
                    # The coordinator accepts this site, yet the SuperNode never got as far as activating:
                    # it cannot start here, and restarting it would fail the same way forever.
                    raise JoinRefusedError(
                        f"the SuperNode could not start (exit code {code}; log {node.supernode_log}):\n"
                        + node.startup_error()
                    )
            if stop.wait(backoff):
                break
            backoff = min(backoff * 2, max_backoff_s)
            node.restarts += 1
            node.start_node()
    finally:
        node.close()
        node.audit.append("session", state="end")
    return 0
