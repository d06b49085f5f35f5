"""The coordinator's dashboard in a real browser during a real run.

A real coordinator (`visionfm-server start`: SuperLink, mutual-TLS gateway, dashboard on loopback) and two
hospitals (`visionfm-client join`) pretrain for two rounds with DP-SGD, tracked in TensorBoard (the
deployed side of experiment tracking). Debian's Chromium, driven by Playwright with an
operator's client certificate, watches the page refresh itself: both hospitals online, the round counter
advancing to 2, metric plots rendered, epsilon per site. The access policy is checked with httpx against
the federation CA: no certificate fails the handshake, a hospital's certificate and a revoked operator's
are refused.

Set VISIONFM_DASHBOARD_SCREENSHOT=docs/dashboard.png to refresh the screenshot in the docs.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.deployment.conftest import (
    REPO,
    CoordinatorHandle,
    Federation,
    Processes,
    join_site,
    online_nodes,
    site_data,
    wait_until,
    write_deploy_job,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SITES = ("hospital-a", "hospital-b")
BUDGET = ("--privacy-epsilon", "8", "--privacy-delta", "1e-5")


def _require_browser() -> None:
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("the dashboard test needs Playwright: pip install playwright (in the dev extra)")
    if not CHROMIUM.is_file():
        pytest.skip(f"no browser: {CHROMIUM} is missing (Debian: apt-get install -y chromium)")


def _certs_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "certs", *args],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
    )


def _get(url: str, ca: Path, cert: tuple[Path, Path] | None) -> httpx.Response:
    context = ssl.create_default_context(cafile=str(ca))  # the coordinator's certificate must verify
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    with httpx.Client(verify=context, timeout=30) as client:
        return client.get(url)


def _text(page: Any, selector: str) -> str | None:
    """The element's text, or None while the page is reloading itself."""
    from playwright.sync_api import Error

    try:
        return page.text_content(selector, timeout=2000)
    except Error:
        return None


def test_operator_watches_a_two_round_run_in_a_browser(
    coordinator: CoordinatorHandle, federation: Federation, processes: Processes, tmp_path: Path
) -> None:
    _require_browser()
    from playwright.sync_api import sync_playwright

    pki = federation.store.root
    issued = _certs_cli("operator", str(pki), "alice")
    assert issued.returncode == 0, issued.stdout + issued.stderr
    alice = (pki / "operators" / "alice" / "operator.crt", pki / "operators" / "alice" / "operator.key")
    url = coordinator.state().dashboard_url
    assert url.startswith("https://127.0.0.1:"), url  # loopback by default

    # The coordinator's TLS and access policy: certificate verified against the federation CA, then
    # operators only.
    with pytest.raises(httpx.TransportError):  # refused in the handshake (TLS 1.3: seen on first read)
        _get(url, federation.store.ca_cert, None).raise_for_status()
    hospital = federation.store.hospital("hospital-a")
    refused = _get(url, federation.store.ca_cert, (hospital.client_cert, hospital.client_key))
    assert refused.status_code == 403 and "operator" in refused.text
    assert _get(url, federation.store.ca_cert, alice).status_code == 200
    assert _certs_cli("operator", str(pki), "bob").returncode == 0
    bob = (pki / "operators" / "bob" / "operator.crt", pki / "operators" / "bob" / "operator.key")
    assert _get(url, federation.store.ca_cert, bob).status_code == 200
    assert _certs_cli("operator", str(pki), "bob", "--revoke").returncode == 0
    revoked = _get(url, federation.store.ca_cert, bob)  # the running dashboard reads the live register
    assert revoked.status_code == 403 and "revoked" in revoked.text

    data = site_data(tmp_path / "data", count=2)
    for name, path in zip(SITES, data, strict=True):
        join_site(processes, federation.bundle(name), path, tmp_path / f"site-{name}", *BUDGET)
    wait_until(lambda: online_nodes(coordinator) >= set(SITES), 120, "both hospitals online")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # empty: no state from any earlier run
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            # Playwright presents the client certificate itself; the server certificate was verified above.
            ignore_https_errors=True,
            client_certificates=[{"origin": url.rstrip("/"), "certPath": str(alice[0]), "keyPath": str(alice[1])}],
            viewport={"width": 1280, "height": 900},
        )
        try:
            page = browser.new_page()
            page.goto(url)
            assert "coordinator dashboard" in (page.text_content("h1") or "")
            wait_until(lambda: _text(page, "#online-count") == "2", 60, "the page to show 2 hospitals online")

            job = write_deploy_job(
                tmp_path, "dashboard", rounds=2, min_sites=2, round_timeout=120,
                privacy={"noise-multiplier": 1.0, "expected-batch-size": 8},
                extra_run_config='tracking = "tensorboard"\n',
            )
            submitted = coordinator.cli("run", str(job), "--detach")
            assert submitted.returncode == 0, submitted.stdout + submitted.stderr

            # The page refreshes itself (meta refresh): no reload from the test.
            seen: list[int] = []

            def counter_at_two() -> bool:
                text = _text(page, "#round-counter")
                if text is not None and text.strip().isdigit() and (not seen or seen[-1] != int(text)):
                    seen.append(int(text))
                return bool(seen) and seen[-1] == 2

            wait_until(counter_at_two, 400, "the round counter to reach 2", poll_s=1.0)
            assert seen == sorted(seen) and seen[0] < 2, seen  # it advanced, never went back
            assert _text(page, "#round-total") == "2"

            # DP-SGD sites report epsilon, not their loss (an unprivatised number): epsilon is plotted.
            page.wait_for_selector("#plot-epsilon", timeout=60_000, state="attached")
            widths = page.eval_on_selector_all("img.plot", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
            assert widths and all(w > 100 for w in widths), widths  # every plot decoded and rendered
            names = page.eval_on_selector_all("img.plot", "imgs => imgs.map(i => i.id)")
            assert {"plot-epsilon", "plot-bytes_sent"} <= set(names), names
            # Under DP the sites release no evaluation scores (nothing un-accounted leaves a site), and this
            # deployment has no held-out data at the coordinator: no probe plot.
            assert "plot-knn_accuracy" not in names, names
            privacy = _text(page, "#privacy") or ""
            assert privacy.count("fundus") == 2, privacy  # one row per site: epsilon spent so far
            html = page.content()
            assert str(tmp_path / "data") not in html  # no site's paths, only labels and numbers
            time.sleep(1.0)
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            target = os.environ.get("VISIONFM_DASHBOARD_SCREENSHOT")
            if target:
                shutil.copyfile(shot, REPO / target)
        finally:
            browser.close()

    # The deployed run was tracked: TensorBoard's own reader finds each round's numbers and the encoders.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = coordinator.state_dir / "runs" / "dashboard"
    wait_until(lambda: (out / "report.md").is_file(), 120, "the run's report")
    wait_until(lambda: (out / "tensorboard" / "encoders" / "fundus.safetensors").is_file(), 30, "tracked encoders")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    epsilon = [t for t in events.Tags()["scalars"] if t.endswith("/fundus/epsilon")]
    assert len(epsilon) == 2, events.Tags()["scalars"]
    assert [e.step for e in events.Scalars(epsilon[0])] == [1, 2]
