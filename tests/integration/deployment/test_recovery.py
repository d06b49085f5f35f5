"""Failures during a real run: a site killed mid-round, then the coordinator killed after a round.

3 sites, at least 2 needed per round, 3 rounds of the real app:
* round 1: site C is killed (its whole process tree, SIGKILL) while training and its `join` started
  again at once; the round completes with A and B once the round timeout passes;
* round 2: C takes part again;
* after round 2's checkpoint the coordinator's whole process tree is killed (SIGKILL), started again,
  and `visionfm-server run JOB --resume` finishes round 3 with all three sites, from round 2's
  checkpoint: every (round, site) is counted exactly once.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path

import pytest

from server.processes import stop_tree
from tests.integration.deployment.conftest import (
    HOSPITALS,
    CoordinatorHandle,
    Federation,
    Processes,
    join_site,
    online_nodes,
    site_data,
    start_coordinator,
    wait_until,
    write_deploy_job,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _train_sites_per_round(out: Path) -> dict[int, int]:
    rows = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else []
    keys = [(r["round"], r["site"], r["modality"]) for r in rows if r["phase"] == "train"]
    duplicates = [k for k, n in Counter(keys).items() if n > 1]
    assert not duplicates, f"counted twice: {duplicates}"
    return dict(Counter(r for r, _, _ in keys))


def _checkpointed(out: Path, server_round: int) -> bool:
    return (out / "checkpoints" / f"round-{server_round:04d}" / "round.json").is_file()


def test_killed_site_rejoins_and_killed_coordinator_resumes(
    coordinator: CoordinatorHandle, federation: Federation, processes: Processes, tmp_path: Path
) -> None:
    data = site_data(tmp_path / "data")
    works = {name: tmp_path / f"site-{name}" for name in HOSPITALS}
    sites = {
        name: join_site(processes, federation.bundle(name), path, works[name])
        for name, path in zip(HOSPITALS, data, strict=True)
    }
    wait_until(lambda: online_nodes(coordinator) == set(HOSPITALS), 120, "all three hospitals online")

    job = write_deploy_job(tmp_path, "recover", rounds=3, min_sites=2, round_timeout=60, eval_every=10)
    submitted = coordinator.cli("run", str(job), "--detach")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    out = coordinator.state_dir / "runs" / "recover"

    # Round 1: kill site C as soon as it has received its training message.
    victim = "hospital-c"
    node_log = works[victim] / "logs" / "supernode.log"
    wait_until(
        lambda: node_log.exists() and "Receiving: train message" in node_log.read_text(),
        180,
        "site C to receive round 1",
    )
    stop_tree(sites[victim], grace_s=0.0, sig=signal.SIGKILL)
    # Its supervisor (systemd, say) starts `join` again at once; round 1 still ends without C's update.
    join_site(processes, federation.bundle(victim), data[2], works[victim])
    wait_until(lambda: _checkpointed(out, 1), 180, "round 1 to complete without site C")
    assert _train_sites_per_round(out)[1] == 2

    # Round 2 includes C again.
    wait_until(lambda: _checkpointed(out, 2), 240, "round 2")
    assert _train_sites_per_round(out)[2] == 3

    # The coordinator dies after round 2 (machine crash: every process of it, SIGKILL).
    stop_tree(coordinator.process, grace_s=0.0, sig=signal.SIGKILL)
    assert not _checkpointed(out, 3)
    restarted = start_coordinator(processes, federation, coordinator.state_dir)
    wait_until(lambda: online_nodes(restarted) >= set(HOSPITALS), 120, "the sites to reconnect")

    resumed = restarted.cli("run", str(job), "--resume", timeout=400)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming after round 2" in resumed.stdout
    assert _train_sites_per_round(out) == {1: 2, 2: 3, 3: 3}
    assert (out / "encoders" / "fundus.safetensors").is_file()
