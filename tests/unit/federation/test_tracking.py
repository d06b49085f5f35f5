"""Experiment tracking, read back with each tool's own reader: MLflow's client on the local store in the run
folder, TensorBoard's event accumulator on the event files. The rows are a run's real MetricsLog, saved
round by round as the federation saves them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.federation.report import MetricsLog
from server.federation.tracking import RunTracking, open_tracker
from visionfm_core.errors import ConfigError
from visionfm_core.models.checkpoint import save_encoder
from visionfm_core.run_config import RunConfig


def _run(out: Path, tracking: str, rounds: range, resume: bool = False) -> MetricsLog:
    """What the ServerApp does with a tracker: config first, metrics after each save, encoders at the end."""
    cfg = RunConfig(out_dir=str(out), tracking=tracking, num_rounds=2, resume=resume)
    tracker = open_tracker(cfg)
    assert tracker is not None
    log = MetricsLog(out)
    tracking_run = RunTracking(tracker)
    tracking_run.start(cfg.to_flat(), log.rows if resume else [])
    log.on_save.append(tracking_run.rows_saved)
    for server_round in rounds:
        for site, loss in (("site-1", 3.0 - server_round), ("site-2", 2.5 - server_round)):
            log.add(server_round, site, "fundus", "train", {"loss": loss, "num-examples": 8.0})
            log.add(server_round, site, "all", "transport", {"bytes_sent": 1000.0 * server_round})
        log.add(server_round, "server", "all", "timing", {"round_seconds": 1.5, "overhead_share": float("nan")})
        log.save()
    encoders = out / "encoders"
    save_encoder(encoders / "fundus.safetensors", {"w": torch.ones(2, 2)}, {"modality": "fundus"})
    tracking_run.finish_artifacts(encoders)
    tracking_run.close(True)
    return log


def test_mlflow_keeps_config_metrics_per_round_and_encoders_in_the_run_folder(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    _run(out, "mlflow", range(1, 3))
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("visionfm-fed").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["num-rounds"] == "2" and run.data.params["tracking"] == "mlflow"
    history = client.get_metric_history(run.info.run_id, "train/site-1/fundus/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0)]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "transport/site-2/bytes_sent")] == [1000, 2000]
    assert "timing/overhead_share" not in run.data.metrics  # NaN is not logged
    assert [f.path for f in client.list_artifacts(run.info.run_id, "encoders")] == ["encoders/fundus.safetensors"]
    assert (out / "mlruns" / "artifacts").is_dir()  # artifacts stay in the run folder too

    # A resumed run continues the same MLflow run and does not log its earlier rounds twice.
    _run(out, "mlflow", range(3, 4), resume=True)
    (again,) = client.search_runs([run.info.experiment_id])
    assert again.info.run_id == run.info.run_id
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/site-1/fundus/loss")]
    assert steps == [1, 2, 3]


def test_tensorboard_event_files_hold_the_same(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    _run(out, "tensorboard", range(1, 3))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/site-2/fundus/loss")
    assert [(e.step, e.value) for e in loss] == [(1, 1.5), (2, 0.5)]
    assert "timing/round_seconds" in events.Tags()["scalars"]
    assert {"config/text_summary", "encoders/text_summary"} <= set(events.Tags()["tensors"])
    listing = events.Tensors("encoders/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "encoders/fundus.safetensors" in listing and "sha256" in listing
    assert (out / "tensorboard" / "encoders" / "fundus.safetensors").is_file()


def test_an_unknown_tracker_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="tracking"):
        RunConfig(tracking="wandb")
