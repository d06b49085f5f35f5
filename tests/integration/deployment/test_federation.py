"""A real deployment end to end, failures included (one scenario: process start-up is the expensive part).

The coordinator (SuperLink behind the mutual-TLS gateway, node authentication) and 3 hospitals
(`visionfm-client join`: uplink, SuperNode, pre-warmed executor) pretrain the real app (nano ViT, 32 px,
slices of RetinaMNIST) for 3 rounds, at least 2 sites per round:

* round 1: hospital C is killed (its whole process tree, SIGKILL) while it trains; its supervisor starts
  `join` again at once; the round completes with A and B when the round timeout passes;
* round 2: all 3 hospitals: the coordinator gives a site of the last round that dropped out
  `rejoin-grace` seconds to come back before it starts the round;
* after round 2's checkpoint the coordinator's whole process tree is killed (SIGKILL) and started again;
  the hospitals reconnect on their own; `visionfm-server run JOB --resume` finishes round 3 with all 3
  from round 2's checkpoint: every (round, site) is counted exactly once;
* then: report and plots, `export` gives loadable encoders, `status`, `logs --run` (the job per round,
  across both submissions), and each site's audit log.
"""

from __future__ import annotations

import json
import re
import signal
from collections import Counter
from functools import partial
from pathlib import Path

import pytest

from strategies.protocol.processes import stop_tree
from tests.integration.deployment.conftest import (
    HOSPITALS,
    CoordinatorHandle,
    Federation,
    Processes,
    audit_entries,
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


ERROR_KIND_ONLY = re.compile(r"^site error \([A-Za-z][\w ]*\)$")


def _check_run_overview(coordinator: CoordinatorHandle, tmp_path: Path) -> None:
    """`visionfm-server logs --run JOB`: per round who answered, what was rejected (kind only), losses,
    bytes, probes and time, over the killed run and its resumption."""
    result = coordinator.cli("logs", "--run", "pretrain", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    view = json.loads(result.stdout)
    assert [s["resumed_from"] for s in view["submissions"]] == [None, 2]
    # The run that died with the coordinator had ended before the resumption took over: `--resume` stops
    # it, unless the restarted SuperLink has already marked it failed (its ServerApp's heartbeat stopped
    # with the coordinator); which of the two comes first is a race, either way it is no longer running.
    first, resumed = (s["status"] for s in view["submissions"])
    assert first in ("finished:stopped", "finished:failed"), first
    assert resumed == "finished:completed"
    assert view["submissions"][1]["bytes_sent"] > 0
    rounds = {r["round"]: r for r in view["rounds"]}
    assert {k: len(r["answered"]) for k, r in rounds.items() if k} == {1: 2, 2: 3, 3: 3}
    # Round 1 lost hospital C: its message came back as an error, or not at all; only the error's kind shows.
    assert rounds[1]["rejected"] or rounds[1]["unanswered"], rounds[1]
    assert all(ERROR_KIND_ONLY.match(r["kind"]) for k in rounds for r in rounds[k]["rejected"]), rounds
    for k in (1, 2, 3):
        for site in rounds[k]["answered"]:
            numbers = rounds[k]["sites"][site]
            assert numbers["fundus/loss"] > 0 and numbers["bytes_sent"] > 0, numbers
        assert rounds[k]["timing"]["round_seconds"] > 0
    assert all("knn_accuracy" in probe for k in (0, 3) for probe in rounds[k]["evaluation"])
    assert len(rounds[3]["evaluation"]) == 3
    human = coordinator.cli("logs", "--run", "pretrain").stdout
    assert "round 1 · 2 site(s) answered" in human and "resumed after round 2" in human, human
    assert str(tmp_path) not in human + result.stdout  # no path of any site (or of the coordinator)


def test_three_hospitals_pretrain_through_a_killed_site_and_a_killed_coordinator(
    coordinator: CoordinatorHandle, federation: Federation, processes: Processes, tmp_path: Path
) -> None:
    data = site_data(tmp_path / "data")
    works = {name: tmp_path / f"site-{name}" for name in HOSPITALS}
    sites = {
        name: join_site(processes, federation.bundle(name), path, works[name])
        for name, path in zip(HOSPITALS, data, strict=True)
    }
    wait_until(lambda: online_nodes(coordinator) == set(HOSPITALS), 120, "all three hospitals online")

    job = write_deploy_job(tmp_path, "pretrain", rounds=3, min_sites=2, round_timeout=45, eval_every=10)
    submitted = coordinator.cli("run", str(job), "--detach")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    out = coordinator.state_dir / "runs" / "pretrain"

    # Round 1: kill hospital C as soon as it has received its training message; restart it at once.
    victim = "hospital-c"
    node_log = works[victim] / "logs" / "supernode.log"
    wait_until(lambda: "Receiving: train message" in node_log.read_text(), 180, "hospital C to receive round 1")
    stop_tree(sites[victim], grace_s=0.0, sig=signal.SIGKILL)
    join_site(processes, federation.bundle(victim), data[2], works[victim])
    wait_until(lambda: _checkpointed(out, 1), 180, "round 1 to complete without hospital C")
    assert _train_sites_per_round(out)[1] == 2

    # Round 2 includes C again.
    wait_until(lambda: _checkpointed(out, 2), 180, "round 2")
    assert _train_sites_per_round(out)[2] == 3

    # The coordinator dies after round 2 (a machine crash: every process of it, SIGKILL).
    stop_tree(coordinator.process, grace_s=0.0, sig=signal.SIGKILL)
    assert not _checkpointed(out, 3)
    restarted = start_coordinator(processes, federation, coordinator.state_dir)
    wait_until(lambda: online_nodes(restarted) >= set(HOSPITALS), 120, "the hospitals to reconnect")

    resumed = restarted.cli("run", str(job), "--resume", timeout=400)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming after round 2" in resumed.stdout
    assert "round 3/3" in resumed.stdout and "completed" in resumed.stdout
    assert _train_sites_per_round(out) == {1: 2, 2: 3, 3: 3}
    assert (out / "report.md").is_file() and list((out / "plots").glob("*.png"))

    _check_run_overview(restarted, tmp_path)

    exported = tmp_path / "export"
    result = restarted.cli("export", "pretrain", "--out", str(exported))
    assert result.returncode == 0, result.stdout + result.stderr
    from visionfm_core.models.checkpoint import build_encoder_from_checkpoint

    encoder, meta = build_encoder_from_checkpoint(exported / "fundus.safetensors")
    assert meta["modality"] == "fundus" and sum(p.numel() for p in encoder.parameters()) > 0

    status = restarted.cli("status")
    assert status.returncode == 0, status.stderr
    assert all(f"hospital {name}: online" in status.stdout for name in HOSPITALS)
    assert "finished:completed" in status.stdout

    # Each site used the pre-warmed executor and logged the bytes that left it through its uplink.
    for work in works.values():
        assert "pre-imported" in (work / "logs" / "executor.log").read_text()
    for process in processes.started:
        if process.poll() is None:
            process.terminate()  # a site's `join` writes its last transport entry as it leaves
    for work in works.values():
        wait_until(partial(audit_entries, work, "transport"), 30, "the uplink's transport entry")
        assert sum(int(e["bytes_out"]) for e in audit_entries(work, "transport")) > 10_000
