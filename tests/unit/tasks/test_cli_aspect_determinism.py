"""`visionfm finetune` end to end on wide OCT B-scans: the model takes a non-square input that
`evaluate` and `predict` reuse, and the same seed gives the same metrics and weights twice."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from visionfm_core.cli import build_app
from visionfm_core.tasks.persistence import load_task_model

APP = build_app()
TINY = ["--arch", "nano", "--image-size", "32", "--device", "cpu", "--threads", "1", "--min-steps", "4",
        "--epochs", "2", "--mode", "binary", "--modality", "oct", "--seed", "3"]


@pytest.fixture(autouse=True)
def private_site_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISIONFM_STATE_DIR", str(tmp_path / "state"))


def run(*args: str | Path) -> str:
    result = CliRunner().invoke(APP, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def wide_scans(folder: Path, count: int = 20) -> Path:
    """Grey 120x48 "B-scans" (2.5:1); class 1 has its bright band low, class 0 high."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    rows = []
    for i in range(count):
        label = int(i % 4 == 0)  # 25 % positive
        image = rng.integers(0, 50, size=(48, 120), dtype=np.uint8)
        band = slice(30, 40) if label else slice(8, 18)
        image[band] = 210
        Image.fromarray(image).save(folder / f"scan_{i:02d}.png")
        rows.append((f"scan_{i:02d}.png", label))
    with (folder / "train.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("image", "label"), *rows])
    return folder / "train.csv"


def test_wide_oct_scans_keep_their_aspect_and_a_seed_repeats(tmp_path: Path) -> None:
    data = wide_scans(tmp_path / "scans")
    summaries, weights = [], []
    for run_index in range(2):
        model = tmp_path / f"model_{run_index}.safetensors"
        report = tmp_path / f"report_{run_index}.json"
        run("finetune", data, "--out", model, "--report", report, *TINY)
        summaries.append(json.loads(report.read_text()))
        weights.append(load_file(str(model)))
    assert summaries[0]["validation"] == summaries[1]["validation"]
    assert summaries[0]["history"] == summaries[1]["history"]
    assert weights[0].keys() == weights[1].keys()
    assert all(bool((weights[0][k] == weights[1][k]).all()) for k in weights[0])
    loaded = load_task_model(tmp_path / "model_0.safetensors")
    assert loaded.preprocess.input_shape == (16, 48)  # 2.5:1 with the 2x2-patch budget of a 32 square
    metrics = json.loads(run("evaluate", tmp_path / "model_0.safetensors", data, "--bootstrap", "0",
                             "--threads", "1", "--device", "cpu"))["metrics"]
    assert metrics["count"] == 20
    out = tmp_path / "predictions.csv"
    run("predict", tmp_path / "model_0.safetensors", tmp_path / "scans", "--out", out, "--threads", "1",
        "--device", "cpu")
    with out.open(newline="") as handle:
        assert len([row for row in csv.DictReader(handle) if row.get("class_id")]) == 20
