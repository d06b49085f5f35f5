"""Side-by-side summary of federated, centralized and local-only runs on the same test split."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server.federation.report import MetricsLog

SCORES = ("knn_accuracy", "knn_auc", "linear_accuracy", "linear_auc")


def test_scores(log: MetricsLog, server_round: int | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """{arm: {modality: scores}} of the held-out test split at `server_round` (default: the last round).
    Local-only runs have one arm per site."""
    rows = [r for r in log.rows if r["phase"] == "evaluate" and str(r["site"]).endswith("global-test")]
    if not rows:
        return {}
    target = max(int(r["round"]) for r in rows) if server_round is None else server_round
    result: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        if int(row["round"]) != target:
            continue
        arm = str(row["site"]).removesuffix("global-test").rstrip(":") or "federated"
        result.setdefault(arm, {})[str(row["modality"])] = {k: float(row[k]) for k in SCORES if k in row}
    return result


def comparison_rows(logs: dict[str, MetricsLog]) -> list[dict[str, Any]]:
    """One row per mode, arm and modality: scores at round 0 (random encoder) and at the last round."""
    rows = []
    for mode, log in logs.items():
        first, last = test_scores(log, 0), test_scores(log)
        for arm, per_modality in last.items():
            for modality, scores in per_modality.items():
                row: dict[str, Any] = {"mode": mode, "arm": arm, "modality": modality}
                for key in SCORES:
                    row[f"{key}_round0"] = first.get(arm, {}).get(modality, {}).get(key, math.nan)
                    row[key] = scores.get(key, math.nan)
                rows.append(row)
    return rows


# The fine-tuned task's held-out scores compared across arms (the first of each is its headline).
FINETUNE_SCORES = {"dice": "Dice", "iou": "IoU", "threshold": "threshold", "mre": "MRE (px)", "map50": "mAP@0.5",
                   "accuracy": "accuracy", "auc": "AUC", "mae": "MAE"}


def finetune_rows(logs: dict[str, MetricsLog]) -> list[dict[str, Any]]:
    """One row per mode, arm and modality: the fine-tuned task model's scores on the held-out test data
    after the last fine-tune round (federated; pooled at one site; each hospital alone)."""
    rows = []
    for mode, log in logs.items():
        tested = [r for r in log.rows if r["phase"] == "finetune-evaluate" and str(r["site"]).endswith("global-test")]
        if not tested:
            continue
        last = max(int(r["round"]) for r in tested)
        for row in tested:
            if int(row["round"]) == last:
                arm = str(row["site"]).removesuffix("global-test").rstrip(":") or "federated"
                scores = {k: float(row[k]) for k in FINETUNE_SCORES if isinstance(row.get(k), (int, float))}
                rows.append({"mode": mode, "arm": arm, "modality": str(row["modality"]),
                             "finetune_round": int(row.get("finetune_round", 0)), **scores})
    return rows


def reference_rows(reference: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Rows for the colour-statistics reference (no encoder, so no round 0)."""
    return [{"mode": "reference", "arm": "colour statistics", "modality": modality,
             **{f"{k}_round0": None for k in SCORES}, **{k: scores[k] for k in SCORES}}
            for modality, scores in reference.items()]


def write_comparison(out_dir: Path, rows: Sequence[dict[str, Any]],
                     tuned: Sequence[dict[str, Any]] = ()) -> Path:
    """comparison.json and comparison.md in `out_dir`; with fine-tuning rows (`finetune_rows`) also
    comparison-finetune.json and a second table: the task's held-out scores per arm."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.json").write_text(json.dumps(list(rows), indent=1))
    lines = ["# Federated vs centralized vs local-only (held-out test split)", "",
             "| mode | arm | modality | k-NN acc (round 0 → last) | k-NN AUC | linear acc | linear AUC |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[k]:.3f}" if r[k + "_round0"] is None else f"{r[k + '_round0']:.3f} → {r[k]:.3f}"
                 for k in SCORES]
        lines.append(f"| {r['mode']} | {r['arm']} | {r['modality']} | " + " | ".join(cells) + " |")
    if tuned:
        (out_dir / "comparison-finetune.json").write_text(json.dumps(list(tuned), indent=1))
        keys = [k for k in FINETUNE_SCORES if any(k in r for r in tuned)]
        lines += ["", "## Fine-tuned task on the held-out test data (last fine-tune round)", "",
                  "federated: the averaged model; centralized: every hospital's training data pooled at one "
                  "site; local: each hospital alone on its own share. Same task, schedule and held-out images.",
                  "", "| mode | arm | modality | " + " | ".join(FINETUNE_SCORES[k] for k in keys) + " |",
                  "|---|---|---|" + "---|" * len(keys)]
        for r in tuned:
            cells = [f"{r[k]:.3f}" if k in r else "" for k in keys]
            lines.append(f"| {r['mode']} | {r['arm']} | {r['modality']} | " + " | ".join(cells) + " |")
    path = out_dir / "comparison.md"
    path.write_text("\n".join(lines) + "\n")
    return path
