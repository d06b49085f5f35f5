"""The label-efficiency section of a simulation's `report.md`: where the curve that shows what pretraining buys a
hospital with few labels is (bench/bench_label_efficiency.py), and, when that bench's JSON and plot sit in the
run folder, a small table of it with the plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TITLE = "## Label efficiency: what pretraining buys a hospital with few labels"
RESULT_NAME = "label_efficiency.json"
PLOT_NAME = "label_efficiency.png"
ARM_TITLES = {"random_init": "random init", "local_ssl": "local-only SSL", "federated_ssl": "federated SSL",
              "centralized_ssl": "centralized SSL"}
COMMAND = "python bench/bench_label_efficiency.py"


def _count_order(count: str) -> tuple[int, int]:
    return (1, 0) if count == "all" else (0, int(count)) if count.isdigit() else (2, 0)


def _table(summary: dict[str, Any], task: str, heading: str) -> list[str]:
    arms = [a for a in ARM_TITLES if a in summary.get(task, {})]
    if not arms:
        return []
    counts = sorted({c for a in arms for c in summary[task][a]}, key=_count_order)
    lines = ["", heading, "", "| init | " + " | ".join(f"{c} labels" for c in counts) + " |",
             "|---|" + "---|" * len(counts)]
    for arm in arms:
        cells = []
        for count in counts:
            point = summary[task][arm].get(count)
            cells.append(f"{point['mean']:.3f} ± {point['std']:.3f}" if point else "")
        lines.append(f"| {ARM_TITLES[arm]} | " + " | ".join(cells) + " |")
    return lines


def label_efficiency_lines(run_dir: Path) -> list[str]:
    """The report section for `run_dir`: the bench's numbers and plot when its JSON is there (a malformed one
    is named, not fatal), and always where the full curve comes from."""
    lines = ["", TITLE, ""]
    result = run_dir / RESULT_NAME
    summary: dict[str, Any] = {}
    if result.is_file():
        try:
            loaded = json.loads(result.read_text(encoding="utf-8"))
            summary = loaded.get("summary", {}) if isinstance(loaded, dict) else {}
            if not isinstance(summary, dict):
                summary = {}
        except (OSError, ValueError):
            lines.append(f"`{RESULT_NAME}` in this folder could not be read as the bench's JSON; rerun the bench.")
    if summary:
        lines.append(f"From `{RESULT_NAME}` in this folder (mean ± standard deviation over seeds; held-out HRF "
                     "photographs, hospital-a fine-tuned on that many labelled photographs, the same fine-tuning "
                     "steps in every arm).")
        lines += _table(summary, "vessels", "Vessel Dice (higher is better):")
        lines += _table(summary, "disc", "Optic-disc centre error, px of the 1752x1168 photographs (lower is better):")
        if (run_dir / PLOT_NAME).is_file():
            lines += ["", f"![label efficiency]({PLOT_NAME})"]
        lines.append("")
    lines.append(f"The full curve (HRF vessel Dice and optic-disc centre error with 2, 4, 8 and all labelled "
                 "photographs, fine-tuned from random init, local-only, federated and centralized SSL, 3 seeds) "
                 f"is drawn by `{COMMAND}` (about half an hour of one CPU core on an otherwise idle machine); "
                 f"it writes `{RESULT_NAME}` and `{PLOT_NAME}` to `runs/label-efficiency/`. With "
                 "`--report-into <this run folder>` it copies both here and this section shows them.")
    return lines


def append_label_efficiency_section(run_dir: Path) -> None:
    """Add (or refresh) the section at the end of `run_dir/report.md`, if the report exists."""
    report = run_dir / "report.md"
    if not report.is_file():
        return
    text = report.read_text(encoding="utf-8")
    if TITLE in text:  # refresh: the section is always the report's last
        text = text[: text.index(TITLE)].rstrip("\n") + "\n"
    report.write_text(text + "\n".join(label_efficiency_lines(run_dir)[1:]) + "\n", encoding="utf-8")
