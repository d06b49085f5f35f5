"""`join` when the coordinator cannot be reached: it keeps asking, and gives up only when told to.

Real TLS probes against a port nothing listens on (a coordinator that is down or cut off); the bundle is
a real provisioned one. The full outage story, with processes and a relay, is test_network_blip.py."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from certs.bundle import load_bundle
from client.join import SiteOfflineError, SiteSettings, admit, refusal_in_log
from client.uplink import probe_coordinator
from strategies.protocol.processes import free_port
from tests.integration.deployment.conftest import Federation

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def _settings(federation: Federation, tmp_path: Path, max_offline_s: float) -> SiteSettings:
    return SiteSettings(
        bundle_dir=federation.bundle("hospital-a"),
        data_path=tmp_path,
        modalities=["fundus"],
        work_dir=tmp_path / "site",
        coordinator=f"127.0.0.1:{free_port()}",  # nothing listens there
        max_offline_s=max_offline_s,
    )


def test_an_unreachable_coordinator_is_asked_again_until_max_offline(federation: Federation, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(SiteOfflineError, match="gave up after") as caught:
        admit(_settings(federation, tmp_path, max_offline_s=4.0), max_backoff_s=1.0)
    waited = time.monotonic() - started
    assert "Connection refused" in str(caught.value)
    assert 2.0 <= waited < 30, waited  # it asked again (1 s backoffs) instead of failing at the first refusal


def test_without_max_offline_it_keeps_asking_until_stopped(federation: Federation, tmp_path: Path) -> None:
    stop = threading.Event()
    threading.Timer(4.0, stop.set).start()
    assert admit(_settings(federation, tmp_path, max_offline_s=0.0), stop, max_backoff_s=1.0) is None
    assert stop.is_set()


def test_a_network_failure_while_activating_is_not_a_refusal() -> None:
    # Flower gives up activating on errors whose text mentions TLS; a cut connection can produce one.
    cut = (
        "ERROR :     Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n"
        "[SSL: UNEXPECTED_EOF_WHILE_READING] EOF occurred in violation of protocol (_ssl.c:2406)\n"
    )
    assert refusal_in_log(cut) is None
    refused = cut.replace("[SSL: UNEXPECTED_EOF_WHILE_READING] EOF", "[code: 2004] Failed to activate SuperNode.")
    assert refusal_in_log(refused) is not None


def test_a_connection_cut_during_the_tls_handshake_is_not_a_refusal(federation: Federation) -> None:
    # A network path that drops the connection as soon as it is opened (a blip, a flapping link).
    listener = socket.create_server(("127.0.0.1", 0))

    def cut() -> None:
        with listener:
            for _ in range(2):
                conn, _ = listener.accept()
                conn.close()

    threading.Thread(target=cut, daemon=True).start()
    bundle = load_bundle(federation.bundle("hospital-a"))
    probe = probe_coordinator(bundle, f"127.0.0.1:{listener.getsockname()[1]}", timeout_s=5)
    assert not probe.ok and not probe.refused, probe.message
