"""SecAgg+ in deployment: three hospitals (real SuperLink and SuperNodes over TLS) train one round whose
update reaches the coordinator only as masked vectors; the coordinator learns the sum, no site's update."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from server.federation.checkpoints import load_round
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

pytestmark = [pytest.mark.integration, pytest.mark.timeout(480)]


def test_three_hospitals_aggregate_securely_in_deployment(
    coordinator: CoordinatorHandle, federation: Federation, processes: Processes, tmp_path: Path
) -> None:
    data = site_data(tmp_path / "data")
    works = {name: tmp_path / f"site-{name}" for name in HOSPITALS}
    for name, path in zip(HOSPITALS, data, strict=True):
        join_site(processes, federation.bundle(name), path, works[name])
    wait_until(lambda: online_nodes(coordinator) == set(HOSPITALS), 120, "all three hospitals online")

    job = write_deploy_job(tmp_path, "secure", rounds=1, min_sites=3, round_timeout=90, eval_every=10,
                           extra_run_config="secure-aggregation = true\n")
    result = coordinator.cli("run", str(job), timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    out = coordinator.state_dir / "runs" / "secure"
    wait_until(lambda: (out / "report.md").is_file(), 60, "the report")

    # The global model moved: the securely aggregated mean of the three updates was applied.
    before, after = load_round(out, 0), load_round(out, 1)
    key = "fundus/backbone.blocks.0.attn.qkv.weight"
    assert not np.allclose(before[key], after[key])
    rows = json.loads((out / "metrics.json").read_text())
    assert len({r["site"] for r in rows if r["phase"] == "train" and r["round"] == 1}) == 3
    assert "rejected" not in (out / "report.md").read_text()

    # What each site sent: no weight arrays in its training reply (the update waited on the site), then
    # the SecAgg+ stages as query replies, the masked vector among them.
    for name in HOSPITALS:
        replies = audit_entries(works[name], "reply")
        train = [e for e in replies if "train" in str(e["message_type"])]
        queries = [e for e in replies if "query" in str(e["message_type"])]
        assert train and all(not e.get("arrays") for e in train), train
        assert len(queries) >= 3, [e["message_type"] for e in replies]
