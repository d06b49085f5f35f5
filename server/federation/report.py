"""Run outputs: metrics.csv / metrics.json (one row per round, site and modality), PNG plots of every
metric per round, and a markdown report that summarises the run."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from visionfm_core.models.checkpoint import atomic_write_bytes

KEY_COLUMNS = ("round", "site", "modality", "phase")
# Above this many lines a plot shows the median and range over sites instead (many sampled sites).
MAX_PLOTTED_SERIES = 12
PLOTTED = ("loss", "knn_accuracy", "knn_auc", "linear_accuracy", "linear_auc", "epsilon", "bytes_sent")


class MetricsLog:
    """Rows of metrics, persisted after every round so a crash loses nothing already measured."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.rows: list[dict[str, Any]] = []
        # Called with every row after each save (experiment tracking follows the run round by round).
        self.on_save: list[Callable[[list[dict[str, Any]]], None]] = []
        existing = out_dir / "metrics.json"
        if existing.is_file():
            self.rows = json.loads(existing.read_text())

    def drop_after(self, server_round: int) -> None:
        """Forget rows of rounds after `server_round` (they are re-run on resume, never counted twice)."""
        self.rows = [r for r in self.rows if int(r["round"]) <= server_round]

    def add(self, server_round: int, site: str, modality: str, phase: str, metrics: dict[str, float]) -> None:
        row: dict[str, Any] = {"round": server_round, "site": site, "modality": modality, "phase": phase}
        row.update({k.replace("-", "_"): float(v) for k, v in metrics.items()})
        self.rows.append(row)

    def columns(self) -> list[str]:
        extra = sorted({k for r in self.rows for k in r} - set(KEY_COLUMNS))
        return [*KEY_COLUMNS, *extra]

    def save(self) -> None:
        """Write metrics.json and metrics.csv atomically."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        payload = json.dumps(self.rows, indent=1).encode()
        atomic_write_bytes(self.out_dir / "metrics.json", lambda tmp: Path(tmp).write_bytes(payload))
        columns = self.columns()

        def write_csv(tmp: str) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                writer.writerows(self.rows)

        atomic_write_bytes(self.out_dir / "metrics.csv", write_csv)
        for listener in self.on_save:
            listener(self.rows)

    def select(self, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.rows if all(r.get(k) == v for k, v in match.items())]


def plot_metrics(rows: Sequence[dict[str, Any]], out_dir: Path, metrics: Iterable[str] = PLOTTED) -> list[Path]:
    """One PNG per metric: a line per (site, modality) over rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for metric in metrics:
        series: dict[str, list[tuple[int, float]]] = {}
        for row in rows:
            value = row.get(metric)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            series.setdefault(f"{row['site']} · {row['modality']}", []).append((int(row["round"]), float(value)))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
        if len(series) > MAX_PLOTTED_SERIES:
            _plot_spread(ax, series)
        else:
            for label, points in sorted(series.items()):
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_xlabel("round")
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{metric}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


PRIVATE_PHASES = ("train", "finetune")


def privacy_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Training rows (pretraining and fine-tuning) that report DP-SGD spending or a refused round."""
    return [r for r in rows if r["phase"] in PRIVATE_PHASES and ("epsilon" in r or "budget_exhausted" in r)]


def budget_summary(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    """Per (site, modality): the epsilon spent by the end (the largest reported), budget, remaining,
    and how many rounds were refused."""
    summary: dict[tuple[str, str], dict[str, float]] = {}
    for row in privacy_rows(rows):
        item = summary.setdefault((str(row["site"]), str(row["modality"])),
                                  {"spent": 0.0, "budget": math.nan, "remaining": math.nan, "refused": 0.0})
        if row.get("budget_exhausted"):
            item["refused"] += 1
        if "epsilon" in row:
            item["spent"] = max(item["spent"], float(row["epsilon"]))
        if "epsilon_budget" in row:
            item["budget"] = float(row["epsilon_budget"])
    for item in summary.values():
        item["remaining"] = max(0.0, item["budget"] - item["spent"]) if math.isfinite(item["budget"]) else math.nan
    return dict(sorted(summary.items()))


def plot_privacy_budget(rows: Sequence[dict[str, Any]], out_dir: Path) -> Path | None:
    """`privacy-budget.png`: per site and modality, epsilon spent (bar) against its budget (marker)."""
    summary = budget_summary(rows)
    if not summary:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [f"{site} · {modality}" for site, modality in summary]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(labels)), 3.6), dpi=110)
    positions = list(range(len(labels)))
    ax.bar(positions, [v["spent"] for v in summary.values()], color="tab:blue", label="epsilon spent")
    ax.scatter(positions, [v["budget"] for v in summary.values()], color="tab:red", marker="_", s=900,
               linewidths=3, label="budget", zorder=3)
    ax.set_xticks(positions, labels, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("epsilon")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "privacy-budget.png"
    fig.savefig(path)
    plt.close(fig)
    return path
def _plot_spread(ax: Any, series: dict[str, list[tuple[int, float]]]) -> None:
    """Median and min-max band per round over all lines (hundreds of sampled sites stay readable)."""
    by_round: dict[int, list[float]] = {}
    for points in series.values():
        for round_, value in points:
            by_round.setdefault(round_, []).append(value)
    rounds = sorted(by_round)
    ax.fill_between(rounds, [min(by_round[r]) for r in rounds], [max(by_round[r]) for r in rounds], alpha=0.25,
                    label=f"range over {len(series)} site·modality lines")
    ax.plot(rounds, [sorted(by_round[r])[len(by_round[r]) // 2] for r in rounds], marker="o", label="median")


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def write_report(out_dir: Path, title: str, config: dict[str, Any], rows: Sequence[dict[str, Any]],
                 plots: Sequence[Path], notes: Sequence[str] = ()) -> Path:
    """A markdown summary: config, the evaluation table per round, plots, notes."""
    lines = [f"# {title}", ""]
    lines += [f"- {note}" for note in notes]
    lines += ["", "## Configuration", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(config.items())]
    evals = [r for r in rows if r["phase"] == "evaluate"]
    if evals:
        lines += ["", "## Frozen-encoder evaluation per round", "",
                  "| round | site | modality | k-NN acc | k-NN AUC | linear acc | linear AUC |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(evals, key=lambda r: (r["round"], r["site"], r["modality"])):
            lines.append("| " + " | ".join(_fmt(r.get(k, "")) for k in (
                "round", "site", "modality", "knn_accuracy", "knn_auc", "linear_accuracy", "linear_auc")) + " |")
    trains = [r for r in rows if r["phase"] == "train"]
    if trains:
        lines += ["", "## Training loss per round", "", "| round | site | modality | loss | images/s |",
                  "|---|---|---|---|---|"]
        for r in sorted(trains, key=lambda r: (r["round"], r["site"], r["modality"])):
            lines.append("| " + " | ".join(_fmt(r.get(k, "")) for k in (
                "round", "site", "modality", "loss", "images_per_s")) + " |")
    private = privacy_rows(rows)
    if private:
        lines += ["", "## Privacy spent per site (DP-SGD)", "",
                  "| round | phase | site | modality | epsilon | delta | budget |", "|---|---|---|---|---|---|---|"]
        for r in sorted(private, key=lambda r: (r["round"], r["site"], r["modality"])):
            budget = "exhausted: round refused" if r.get("budget_exhausted") else _fmt(r.get("epsilon_budget", ""))
            cells = [_fmt(r.get(k, "")) for k in ("round", "phase", "site", "modality", "epsilon", "delta")]
            lines.append("| " + " | ".join(cells) + f" | {budget} |")
        lines += ["", "## Privacy budget per site: spent against budget", "",
                  "Each site's lifetime epsilon after the run (its ledger composes every phase), its budget, and "
                  "the rounds it refused because they would have exceeded it.", "",
                  "| site | modality | epsilon spent | budget | remaining | rounds refused |",
                  "|---|---|---|---|---|---|"]
        for (site, modality), item in budget_summary(rows).items():
            lines.append(f"| {site} | {modality} | {_fmt(item['spent'])} | {_fmt(item['budget'])} | "
                         f"{_fmt(item['remaining'])} | {int(item['refused'])} |")
        budget_plot = plot_privacy_budget(rows, out_dir / "plots")
        if budget_plot is not None and budget_plot not in plots:
            plots = [*plots, budget_plot]
    transport = [r for r in rows if r["phase"] == "transport"]
    if transport:
        lines += ["", "## Bytes sent per site and round", "", "| round | site | bytes |", "|---|---|---|"]
        lines += [f"| {r['round']} | {r['site']} | {int(r['bytes_sent'])} |" for r in transport]
    timing = [r for r in rows if r["phase"] == "timing"]
    if timing:
        lines += ["", "## Round time and overhead", "",
                  "Overhead: round time minus the slowest site's own compute (messaging, waiting, aggregation,"
                  " secure-aggregation stages). In a simulation the sites share this machine's cores.", "",
                  "| round | round s | slowest site s | all sites s | overhead s | overhead share |",
                  "|---|---|---|---|---|---|"]
        for r in sorted(timing, key=lambda r: r["round"]):
            lines.append(f"| {r['round']} | {r['round_seconds']:.2f} | {r['slowest_site_seconds']:.2f} | "
                         f"{r['site_seconds_total']:.2f} | {r['overhead_seconds']:.2f} | {r['overhead_share']:.1%} |")
    lines += _sampling_lines(rows)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    path = out_dir / "report.md"
    text = "\n".join(lines) + "\n"
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def _sampling_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Sites asked, answered and straggling per round, and the memory of the coordinator and the sites."""
    lines: list[str] = []
    sampling = [r for r in rows if str(r["phase"]).startswith("sampling-")]
    if sampling:
        lines += ["", "## Sites asked per round", "",
                  "A seeded sample of the connected sites (fraction-train / fraction-evaluate, at least min-sites); "
                  "stragglers missed the round deadline, and their late replies were dropped unread.", "",
                  "| round | exchange | connected | sampled | replied | stragglers | late replies dropped |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(sampling, key=lambda r: (r["round"], r["phase"])):
            cells = [str(int(r.get(k, 0))) for k in ("connected", "sampled", "replied", "stragglers", "late_dropped")]
            lines.append(f"| {r['round']} | {str(r['phase']).removeprefix('sampling-')} | " + " | ".join(cells) + " |")
    memory = [r for r in rows if r["phase"] == "memory"]
    if memory:
        lines += ["", "## Memory per round (MB)", "",
                  "Resident memory of the coordinator process, and the largest and median a site reported "
                  "(a simulated site: the worker process that ran it).", "",
                  "| round | coordinator | coordinator peak | sites reporting | site max | site median |",
                  "|---|---|---|---|---|---|"]
        for round_ in sorted({int(r["round"]) for r in memory}):
            here = [r for r in memory if int(r["round"]) == round_]
            coordinator = next((r for r in here if r["site"] == "coordinator"), {})
            sites = sorted(float(r.get("rss_mb", 0.0)) for r in here if r["site"] != "coordinator")
            site_max = f"{sites[-1]:.0f}" if sites else ""
            site_median = f"{sites[len(sites) // 2]:.0f}" if sites else ""
            lines.append(f"| {round_} | {coordinator.get('rss_mb', float('nan')):.0f} | "
                         f"{coordinator.get('peak_rss_mb', float('nan')):.0f} | {len(sites)} | {site_max} | "
                         f"{site_median} |")
    return lines
