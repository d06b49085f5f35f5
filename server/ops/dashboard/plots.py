"""The dashboard's plots: matplotlib SVGs (object-oriented API, no pyplot state, so safe in the server's
worker threads), embedded in the page as data URIs (no file, no script, no JavaScript build step)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# (metric, title): a line per site and modality over rounds, when the run has the metric.
METRIC_PLOTS = (
    ("loss", "training loss"),
    ("finetune_loss", "fine-tuning loss"),
    ("knn_accuracy", "k-NN accuracy (frozen encoder probe)"),
    ("linear_accuracy", "linear-probe accuracy"),
    ("accuracy", "fine-tuned accuracy"),
    ("dice", "fine-tuned Dice"),
    ("epsilon", "privacy spent (epsilon)"),
)
_LOCK = threading.Lock()  # matplotlib's font and text caches are not made for concurrent use
_LAST: dict[str, list[Plot]] = {}  # the plots of the latest rows: most refreshes find nothing new to draw


@dataclass(frozen=True)
class Plot:
    """One rendered plot."""

    name: str
    title: str
    data_uri: str


def _series(rows: Sequence[dict[str, Any]], metric: str) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        value = row.get(metric)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            continue
        series.setdefault(f"{row['site']} · {row['modality']}", []).append((int(row["round"]), float(value)))
    return series


def _svg_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg")
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure() -> tuple[Figure, Any]:
    # Imported at the first plot, not when the coordinator starts (about a second of CPU per start).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 3.0), dpi=96, layout="tight")
    ax = fig.subplots()
    ax.grid(alpha=0.3)
    ax.set_xlabel("round")
    return fig, ax


def metric_plot(rows: Sequence[dict[str, Any]], metric: str, title: str) -> Plot | None:
    """A line per (site, modality) of `metric` over rounds; None when no row has it."""
    series = _series(rows, metric)
    if not series:
        return None
    with _LOCK:
        fig, ax = _figure()
        for label, points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(title, fontsize=10)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)
        return Plot(metric, title, _svg_uri(fig))


def bytes_plot(per_round: dict[int, float]) -> Plot | None:
    """Bars: bytes the sites sent in each round."""
    if not per_round:
        return None
    with _LOCK:
        fig, ax = _figure()
        ax.bar(list(per_round), [v / 1e6 for v in per_round.values()], color="#4c72b0")
        ax.set_ylabel("MB sent by the sites")
        ax.set_title("bytes per round", fontsize=10)
        ax.xaxis.get_major_locator().set_params(integer=True)
        return Plot("bytes_sent", "bytes per round", _svg_uri(fig))


def run_plots(rows: Sequence[dict[str, Any]], per_round_bytes: dict[int, float]) -> list[Plot]:
    """Every plot the run has data for, in a fixed order (drawn again only when the rows changed)."""
    key = hashlib.sha256(json.dumps([rows, sorted(per_round_bytes.items())], default=str).encode()).hexdigest()
    if key in _LAST:
        return _LAST[key]
    plots = [metric_plot(rows, metric, title) for metric, title in METRIC_PLOTS]
    plots.append(bytes_plot(per_round_bytes))
    drawn = [p for p in plots if p is not None]
    _LAST.clear()
    _LAST[key] = drawn
    return drawn
