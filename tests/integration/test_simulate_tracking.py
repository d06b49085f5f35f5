"""`visionfm simulate --tracking mlflow`: a real simulated federation (Flower's simulation engine, three
sites) logs its config, each round's metrics and its final encoders to the local MLflow store in the run
folder, read back with MLflow's own client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations.simulate import simulate

pytestmark = pytest.mark.integration


def test_a_simulated_run_is_tracked_in_mlflow_round_by_round(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    outcome = simulate("quick", "federated", tmp_path / "tracked",
                       {"num-rounds": 2, "local-steps": 1, "tracking": "mlflow"})
    out = outcome.out_dir
    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlruns' / 'mlflow.db').resolve()}")
    (run,) = client.search_runs([client.get_experiment_by_name("visionfm-fed").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["num-rounds"] == "2" and run.data.params["scenario"].endswith("scenario.json")

    # Every training loss of metrics.json, per site and round, is in MLflow with the round as step.
    rows = json.loads((out / "metrics.json").read_text())
    train = [r for r in rows if r["phase"] == "train" and r["modality"] == "fundus"]
    assert {r["site"] for r in train} == {"hospital-a", "hospital-b", "hospital-c"}
    for row in train:
        history = client.get_metric_history(run.info.run_id, f"train/{row['site']}/fundus/loss")
        assert (row["round"], pytest.approx(row["loss"])) in [(m.step, m.value) for m in history]
    probe = client.get_metric_history(run.info.run_id, "evaluate/global-test/fundus/knn_accuracy")
    assert sorted(m.step for m in probe) == [0, 1, 2]

    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "encoders")}
    assert {"encoders/fundus.safetensors", "encoders/oct.safetensors"} <= artifacts
