"""The dashboard's web application (Starlette): one server-rendered page that refreshes itself, and the same
facts as JSON. Read-only: GET only; no scripts; a strict Content-Security-Policy."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from server.ops.dashboard.access import OperatorPolicy, OperatorsOnly
from server.ops.dashboard.plots import run_plots
from server.ops.dashboard.snapshot import Snapshot

REFRESH_SECONDS = 5
SECURITY_HEADERS = {
    # No script, no external resource; plots are data: URIs, styles inline.
    "content-security-policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
_TEMPLATES = Environment(
    loader=FileSystemLoader(Path(__file__).parent), autoescape=select_autoescape(["html"]), trim_blocks=True
)


def _when(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _megabytes(value: float) -> str:
    return f"{value / 1e6:,.2f} MB"


def render_page(snapshot: Snapshot, operator: str, refresh_s: int = REFRESH_SECONDS) -> str:
    """The page's HTML for one snapshot."""
    current = snapshot.current
    plots = run_plots(current.rows, current.bytes_per_round) if current is not None else []
    online = sum(1 for h in snapshot.hospitals if h.status == "online")
    return _TEMPLATES.get_template("page.html").render(
        s=snapshot, run=current, plots=plots, online=online, operator=operator, refresh_s=refresh_s,
        taken_at=_when(snapshot.taken_at), started_at=_when(snapshot.coordinator_started), megabytes=_megabytes,
    )


def snapshot_json(snapshot: Snapshot) -> dict[str, Any]:
    """The snapshot as JSON-ready data (without the raw metrics rows: those are in the run's metrics.json)."""
    data = dataclasses.asdict(snapshot)
    if data.get("current"):
        data["current"].pop("rows", None)
    return data


def make_app(take_snapshot: Callable[[], Snapshot], policy: OperatorPolicy,
             refresh_s: int = REFRESH_SECONDS) -> Starlette:
    """The Starlette app: `/` (HTML) and `/status.json`, operators only."""

    # Plain functions: Starlette runs them in its thread pool (reading the SuperLink and plotting block).
    def page(request: Request) -> Response:
        html = render_page(take_snapshot(), str(request.scope.get("state", {}).get("operator", "")), refresh_s)
        return HTMLResponse(html, headers=SECURITY_HEADERS)

    def status(request: Request) -> Response:
        return JSONResponse(snapshot_json(take_snapshot()), headers=SECURITY_HEADERS)

    routes = [Route("/", page, methods=["GET"]), Route("/status.json", status, methods=["GET"])]
    return Starlette(routes=routes, middleware=[Middleware(OperatorsOnly, policy=policy)])
