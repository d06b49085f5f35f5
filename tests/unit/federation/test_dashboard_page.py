"""The dashboard page from a snapshot: numbers per round and site, plots as inline SVG, no markup from a
site's strings, no script; and what a request without an operator's certificate gets."""

from __future__ import annotations

import base64
import time

from starlette.testclient import TestClient

from server.ops.dashboard.page import make_app, render_page, snapshot_json
from server.ops.dashboard.snapshot import CurrentRun, Hospital, Rejection, Snapshot, bytes_per_round, latest_epsilon

HOSTILE = '<img src=x onerror="alert(1)">'


def _rows() -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for r in (1, 2, 3):
        for site in ("site-1", "site-2"):
            rows.append({"round": r, "site": site, "modality": HOSTILE, "phase": "train", "loss": 4.0 - r,
                         "epsilon": 1.5 * r, "delta": 1e-5, "epsilon_budget": 8.0})
            rows.append({"round": r, "site": site, "modality": "all", "phase": "transport", "bytes_sent": 1e6})
    return rows


def _snapshot() -> Snapshot:
    rows = _rows()
    timing = {"round": 3.0, "round_seconds": 12.0, "slowest_site_seconds": 9.0, "overhead_share": 0.25}
    run = CurrentRun(job="pretrain", status="running", rounds_done=3, num_rounds=5, in_progress=4, strategy="fedavg",
                     timings=[timing],
                     epsilon=latest_epsilon(rows), bytes_per_round=bytes_per_round(rows), superlink_bytes=(10, 20),
                     rejections=[Rejection(2, "site-2", "invalid update (non-finite values)")], rows=rows)
    return Snapshot("eye-consortium", time.time(), {"forwarded": 3, "rejected": 1},
                    [Hospital("hospital-a", "online"), Hospital("hospital-b", "offline")], [], run)


def test_the_page_shows_progress_privacy_traffic_rejections_and_plots() -> None:
    html = render_page(_snapshot(), "alice")
    assert '<span id="round-counter">3</span>' in html and '<span id="round-total">5</span>' in html
    assert "round 4 in progress" in html and '<span class="big" id="online-count">1</span>' in html
    assert "4.500 of 8" in html  # epsilon spent so far per site, against its budget
    assert "2.00 MB" in html and "invalid update (non-finite values)" in html
    assert 'http-equiv="refresh"' in html and "<script" not in html
    # A string a site chose (here a modality name) is text, never markup; in the plots it is SVG text.
    assert HOSTILE not in html and "&lt;img src=x" in html
    plots = dict(line.split('" src="', 1) for line in html.split('id="plot-')[1:])
    names = [key.split('"')[0] for key in plots]
    assert names == ["loss", "epsilon", "bytes_sent"]
    svg = base64.b64decode(html.split('id="plot-loss" alt="training loss" src="data:image/svg+xml;base64,')[1]
                           .split('"')[0])
    assert svg.startswith(b"<?xml") and b"<svg" in svg and b"<script" not in svg


def test_the_json_view_leaves_out_the_raw_rows() -> None:
    data = snapshot_json(_snapshot())
    assert "rows" not in data["current"] and data["current"]["rounds_done"] == 3


def test_without_an_operator_certificate_nothing_is_served() -> None:
    class RefuseAll:
        def decide(self, cert_pem: str | None) -> object:
            from server.ops.dashboard.access import AccessDecision

            return AccessDecision(False, 401, "a client certificate is required")

    app = make_app(_snapshot, RefuseAll())  # type: ignore[arg-type]
    with TestClient(app) as client:
        for path in ("/", "/status.json"):
            response = client.get(path)
            assert response.status_code == 401 and "eye-consortium" not in response.text
