"""Hostile replay: certificates and the CRL over a federation's lifetime, against a real coordinator
(`visionfm-server start`) and real hospital bundles on loopback. Dates are made, never waited for."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest

from certs.authority import utcnow
from certs.bundle import load_bundle
from client.uplink import probe_coordinator
from tests.integration.deployment.conftest import (
    CoordinatorHandle,
    Federation,
    Processes,
    start_coordinator,
    write_participants,
)
from tests.integration.hostile._ops_support import (  # noqa: F401
    cli,
    coordinator_fixture,
    crl_next_update,
    federation_fixture,
    processes_fixture,
    timed,
    write_crl,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
CRL_CHECK_S = 3.0


def _probe(federation: Federation, hospital: str = "hospital-a") -> str:
    probe = probe_coordinator(load_bundle(federation.bundle(hospital)), federation.address, timeout_s=10)
    return "ok" if probe.ok else probe.message


def test_a_crl_40_days_old_is_named_by_verify_and_refreshed_by_the_coordinator(
    processes: Processes, federation: Federation
) -> None:
    write_crl(federation.store, issued_days_ago=40)
    verify = cli("server.cli", "certs", "verify", str(federation.store.root))
    assert verify.returncode == 1, verify.stdout
    assert "crl.pem" in verify.stdout and "CRL expired on" in verify.stdout
    coordinator = start_coordinator(processes, federation, federation.root / "coordinator")
    assert crl_next_update(federation.store) > utcnow() + dt.timedelta(days=29)  # re-signed at start
    assert _probe(federation) == "ok"
    status = coordinator.cli("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "ERROR" not in status.stdout
    print("finding CRL 40 days old: coordinator re-signed it at start; hospitals unaffected")


def test_an_expired_crl_on_a_running_coordinator_is_reported_as_such_and_fixed_live(
    processes: Processes, federation: Federation, coordinator: CoordinatorHandle, tmp_path: Path
) -> None:
    store = federation.store
    assert _probe(federation) == "ok"
    # The CA key kept offline: the coordinator cannot re-sign, and the CRL it serves has expired.
    offline = tmp_path / "ca.key.offline"
    shutil.move(store.ca_key, offline)
    shutil.copy(offline, store.ca_key)
    write_crl(store, issued_days_ago=40)
    store.ca_key.unlink()
    refused = timed(lambda: _probe(federation) != "ok", 15)
    assert refused is not None
    message = _probe(federation)
    print(f"hospital sees: {message}")
    assert "certificate revocation list (ca/crl.pem) expired on" in message
    assert "EXPIRED" not in message.upper().replace("EXPIRED ON", "")  # no "certificate expired" alert
    status = coordinator.cli("status")
    assert status.returncode == 1 and "crl.pem" in status.stdout and "CRL expired on" in status.stdout, status.stdout
    # The operator brings the CA key back and refreshes: picked up without a restart.
    shutil.move(offline, store.ca_key)
    refresh = cli("server.cli", "certs", "refresh-crl", str(store.root))
    assert refresh.returncode == 0, refresh.stdout + refresh.stderr
    recovered = timed(lambda: _probe(federation) == "ok", 30)
    assert recovered is not None
    print(f"recovered {recovered:.1f}s after `certs refresh-crl` (no restart)")
    assert coordinator.process.poll() is None


def test_a_crl_close_to_expiry_is_re_signed_by_the_running_coordinator(
    processes: Processes, federation: Federation, tmp_path: Path
) -> None:
    # The running coordinator looks at its CRL every --crl-check-seconds (default: every minute; 3 s here,
    # so the test does not wait out a minute) and re-signs it 15 days ahead of expiry.
    store = federation.store
    coordinator = start_coordinator(processes, federation, federation.root / "coordinator",
                                    "--crl-check-seconds", str(CRL_CHECK_S))
    # While `status` looks, the CA key is away (the coordinator cannot re-sign under it); then it is back.
    offline = tmp_path / "ca.key.offline"
    shutil.move(store.ca_key, offline)
    write_crl(store, issued_days_ago=25, ca_key=offline)  # 5 days left: past the coordinator's refresh point
    status = coordinator.cli("status")
    assert "WARNING" in status.stdout and "crl.pem" in status.stdout, status.stdout
    assert "CRL expires on" in " ".join(status.stdout.split()), status.stdout
    assert crl_next_update(store) < utcnow() + dt.timedelta(days=6)  # nothing re-signed it meanwhile
    shutil.move(offline, store.ca_key)
    took = timed(lambda: crl_next_update(federation.store) > utcnow() + dt.timedelta(days=29), 90, poll_s=0.5)
    assert took is not None, "the running coordinator did not re-sign a CRL 5 days from expiry"
    print(f"running coordinator re-signed a CRL 5 days from expiry after {took:.0f}s")
    assert _probe(federation) == "ok"


def test_a_new_hospital_issued_while_running_is_accepted_without_restart(
    processes: Processes, federation: Federation, coordinator: CoordinatorHandle
) -> None:
    participants = write_participants(
        federation.root / "participants.toml",
        federation.gateway_port,
        ("hospital-a", "hospital-b", "hospital-c", "hospital-d"),
    )
    issued = cli("server.cli", "certs", "issue", str(participants), "--out", str(federation.store.root))
    assert issued.returncode == 0, issued.stdout + issued.stderr
    took = timed(lambda: _probe(federation, "hospital-d") == "ok", 30)
    assert took is not None, _probe(federation, "hospital-d")
    print(f"new hospital accepted {took:.1f}s after `certs issue` (no restart)")


def test_certificates_near_expiry_are_warned_and_an_expired_one_names_itself(
    processes: Processes, federation: Federation, coordinator: CoordinatorHandle
) -> None:
    renewed = cli("server.cli", "certs", "renew", str(federation.store.root), "--hospital", "hospital-b", "--days", "3")
    assert renewed.returncode == 0, renewed.stdout
    verify = cli("server.cli", "certs", "verify", str(federation.store.root))
    assert verify.returncode == 0 and "WARNING" in verify.stdout and "renew it soon" in verify.stdout, verify.stdout
    assert _probe(federation, "hospital-b") == "ok"  # the renewed (short) certificate works live
