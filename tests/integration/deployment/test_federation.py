"""A SuperLink behind the gateway and 3 SuperNodes (TLS, node auth, mutual TLS) complete 2 rounds of
pretraining with the real ServerApp/ClientApp: a nano ViT at 32 px on slices of RetinaMNIST."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest

from tests.integration.deployment.conftest import (
    HOSPITALS,
    CoordinatorHandle,
    Federation,
    Processes,
    audit_entries,
    join_site,
    online_nodes,
    site_data,
    wait_until,
    write_deploy_job,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


def test_three_hospitals_complete_two_rounds_of_pretraining(
    coordinator: CoordinatorHandle, federation: Federation, processes: Processes, tmp_path: Path
) -> None:
    data = site_data(tmp_path / "data")
    works = {name: tmp_path / f"site-{name}" for name in HOSPITALS}
    for name, path in zip(HOSPITALS, data, strict=True):
        join_site(processes, federation.bundle(name), path, works[name])
    wait_until(lambda: online_nodes(coordinator) == set(HOSPITALS), 120, "all three hospitals online")

    job = write_deploy_job(tmp_path, "pretrain", rounds=2, min_sites=3, round_timeout=120)
    result = coordinator.cli("run", str(job), timeout=360)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "round 1" in result.stdout and "round 2" in result.stdout
    assert "completed" in result.stdout

    out = coordinator.state_dir / "runs" / "pretrain"
    for server_round in (1, 2):
        assert (out / "checkpoints" / f"round-{server_round:04d}" / "round.json").is_file()
    rows = json.loads((out / "metrics.json").read_text())
    for server_round in (1, 2):
        sites = {r["site"] for r in rows if r["round"] == server_round and r["phase"] == "train"}
        assert len(sites) == 3, rows
    assert (out / "report.md").is_file()
    assert list((out / "plots").glob("*.png"))

    exported = tmp_path / "export"
    result = coordinator.cli("export", "pretrain", "--out", str(exported))
    assert result.returncode == 0, result.stdout + result.stderr
    from visionfm_core.models.checkpoint import build_encoder_from_checkpoint

    encoder, meta = build_encoder_from_checkpoint(exported / "fundus.safetensors")
    assert meta["modality"] == "fundus"
    assert sum(p.numel() for p in encoder.parameters()) > 0

    status = coordinator.cli("status")
    assert status.returncode == 0, status.stderr
    assert all(f"hospital {name}: online" in status.stdout for name in HOSPITALS)
    assert "finished:completed" in status.stdout

    # Each site logged the bytes that left it through its uplink, and used the pre-warmed executor.
    for work in works.values():
        wait_until((work / "logs" / "executor.log").exists, 10, "executor log")
        assert "pre-imported" in (work / "logs" / "executor.log").read_text()
    for proc in processes.started[1:]:
        proc.terminate()
    for work in works.values():
        wait_until(partial(audit_entries, work, "transport"), 30, "the uplink's transport entry")
        assert sum(int(e["bytes_out"]) for e in audit_entries(work, "transport")) > 10_000
