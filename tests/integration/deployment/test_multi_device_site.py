"""A deployed hospital with two CPU workers (`visionfm-client join --devices 2`, gloo) takes part in real
federated rounds over TLS beside a one-device hospital: each round the site sends one update, trained
by both workers on their shards of its images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.deployment.conftest import (
    CoordinatorHandle,
    Federation,
    Processes,
    join_site,
    online_nodes,
    site_data,
    wait_until,
    write_deploy_job,
)

pytestmark = pytest.mark.integration


def test_a_two_worker_site_sends_one_update_per_round(coordinator: CoordinatorHandle, federation: Federation,
                                                       processes: Processes, tmp_path: Path) -> None:
    data = site_data(tmp_path / "data", count=2)
    names = ("hospital-a", "hospital-b")
    works = {name: tmp_path / f"site-{name}" for name in names}
    join_site(processes, federation.bundle(names[0]), data[0], works[names[0]], "--devices", "2")
    join_site(processes, federation.bundle(names[1]), data[1], works[names[1]])
    wait_until(lambda: online_nodes(coordinator) >= set(names), 120, "both hospitals online")

    job = write_deploy_job(tmp_path, "two-workers", rounds=2, min_sites=2, round_timeout=300, eval_every=10)
    done = coordinator.cli("run", str(job), timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads((coordinator.state_dir / "runs" / "two-workers" / "metrics.json").read_text())
    for server_round in (1, 2):
        trained = [r for r in rows if r["phase"] == "train" and r["round"] == server_round]
        # Both hospitals, one row (one update) each. Both hold 48 images and keep the same share for
        # validation, so the two-worker site counts as many training images as the one-device site: all of
        # them, not one worker's shard. The coordinator labels deployed sites by node (site-1, site-2), so
        # hospital A is the one whose update reports two workers behind it; B reports none (one device).
        assert len(trained) == 2 and len({r["site"] for r in trained}) == 2, trained
        assert trained[0]["num_examples"] == trained[1]["num_examples"] > 24, trained
        assert all(r["loss"] > 0 for r in trained)
        assert sorted(r.get("devices", 1.0) for r in trained) == [1.0, 2.0], trained
