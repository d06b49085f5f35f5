"""A real 2-round federation on Flower's simulation engine (Ray) with 3 sites and a nano ViT on the
bundled RetinaMNIST and OCT2017 images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm

from server.federation.checkpoints import load_round
from simulations.simulate import simulate
from visionfm_core.models.checkpoint import load_encoder

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("sim") / "quick"
    return simulate("quick", "federated", out)


def test_run_folder_holds_config_metrics_checkpoints_plots_and_report(quick_run) -> None:
    out: Path = quick_run.out_dir
    config = json.loads((out / "config.json").read_text())
    assert config["num-rounds"] == 2 and config["modalities"] == "fundus,oct"
    for name in ("metrics.csv", "metrics.json", "report.md", "plots/loss.png", "plots/knn_accuracy.png"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round-0000", "round-0001", "round-0002"]
    rows = json.loads((out / "metrics.json").read_text())
    trained = {(r["round"], r["site"], r["modality"]) for r in rows if r["phase"] == "train"}
    # Every round: each fundus site and the one OCT site sent an update.
    for rnd in (1, 2):
        assert {(rnd, s, "fundus") for s in ("hospital-a", "hospital-b", "hospital-c")} <= trained
        assert (rnd, "hospital-c", "oct") in trained
        assert (rnd, "hospital-a", "oct") not in trained
    evaluated = {(r["round"], r["site"]) for r in rows if r["phase"] == "evaluate"}
    assert {(0, "global-test"), (2, "global-test"), (2, "hospital-a")} <= evaluated
    assert all(np.isfinite(r["loss"]) for r in rows if r["phase"] == "train")
    # The colour-statistics reference, scored on the same test split, sits beside the encoder's scores.
    reference = json.loads((out / "reference.json").read_text())
    assert set(reference) == {"fundus", "oct"} and reference == quick_run.reference
    assert reference["fundus"]["num_eval"] == 400
    report = (out / "report.md").read_text()
    assert "## Reference: colour statistics, no encoder" in report
    # The last section says where the few-labels curve comes from (no bench JSON in this folder: no table).
    assert report.rstrip().endswith("shows them.") and "bench/bench_label_efficiency.py" in report


def test_weights_changed_and_exported_encoders_load_into_timm(quick_run) -> None:
    out: Path = quick_run.out_dir
    before, after = load_round(out, 0), load_round(out, 2)
    assert set(before) == set(after)
    for modality in ("fundus", "oct"):
        key = f"{modality}/backbone.blocks.0.attn.qkv.weight"
        assert not np.allclose(before[key], after[key])
    for modality in ("fundus", "oct"):
        state, meta = load_encoder(out / "encoders" / f"{modality}.safetensors")
        assert meta["modality"] == modality and meta["round"] == 2
        model = timm.create_model(meta["timm_name"], **meta["timm_kwargs"])
        model.load_state_dict(state, strict=True)


def test_each_round_reports_its_time_split_into_site_compute_and_overhead(quick_run) -> None:
    rows = json.loads((quick_run.out_dir / "metrics.json").read_text())
    timing = {r["round"]: r for r in rows if r["phase"] == "timing"}
    assert sorted(timing) == [1, 2]
    for row in timing.values():
        # All three sites reported their own compute; the overhead is what the round took beyond the slowest.
        assert row["sites_timed"] == 3 and 0 < row["slowest_site_seconds"] <= row["site_seconds_total"]
        assert row["overhead_seconds"] == pytest.approx(row["round_seconds"] - row["slowest_site_seconds"])
        assert 0 <= row["overhead_share"] < 1
    assert "## Round time and overhead" in (quick_run.out_dir / "report.md").read_text()
