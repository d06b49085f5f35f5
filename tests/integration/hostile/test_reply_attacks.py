"""Issue #14's reply findings replayed on a real deployment: a coordinator (`visionfm-server start`) and three
hospitals (`visionfm-client join`) on 127.0.0.1; hospital C runs the tampered ClientApp and rewrites its
training reply each round as a plan says (NaN/inf/1e15/1.7e308 example counts, a manifest that is not
JSON, a manifest with a wrong shape, +1e4 on every weight, a replayed stale reply).

Each must hold: the run goes on and completes, the bad reply is rejected and logged with its reason,
the honest sites' model stays finite and is exported, and `--resume` continues after such rounds. The
rounds' times are printed (run with -s) as the time to recover from each fault."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.integration.deployment.conftest import (
    HOSPITALS,
    CoordinatorHandle,
    Federation,
    Processes,
    online_nodes,
    site_data,
    wait_until,
    write_deploy_job,
)
from tests.integration.hostile.conftest import PLAN_ENV, tampered_app

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

HOSTILE = "hospital-c"
# Round -> (what hospital C does, the reason the coordinator must log for it).
PLAN = {
    1: ("capture", None),  # honest; kept for the replays below
    2: ("count-nan", "example count fundus/num-examples is nan (not finite)"),
    3: ("count-inf", "example count fundus/num-examples is inf (not finite)"),
    4: ("count-1e15", "example count fundus/num-examples is 1e+15, above the coordinator's cap"),
    5: ("count-1.7e308", "example count fundus/num-examples is 1.7e+308, above the coordinator's cap"),
    6: ("manifest-not-json", "manifest is not JSON"),
    7: ("manifest-wrong-shape", "reaches past the end of its <f4 buffer"),
    8: ("plus-1e4", "fundus update norm"),
    9: ("replay", "stale reply: it answers round 1, this is round 9"),
    10: ("replay-relabelled", "replayed update: identical to its update accepted in round 1"),
}
ROUNDS = len(PLAN)


@dataclass
class HostileDeployment:
    coordinator: CoordinatorHandle
    root: Path
    plan: Path


def _join(processes: Processes, bundle: Path, data: Path, work: Path, env: dict[str, str]) -> None:
    processes.launch(
        ["-m", "client.cli", "join", "--bundle", str(bundle), "--data", str(data), "--modalities", "fundus",
         "--work", str(work), "--gpu", "-1"],
        work.parent / f"{work.name}.out",
        env,
    )


@pytest.fixture(scope="module")
def deployment(shared_coordinator: CoordinatorHandle, shared_federation: Federation,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileDeployment]:
    """Three hospitals online for the whole module; hospital C reads its tamper plan from `plan`."""
    root = tmp_path_factory.mktemp("hostile")
    plan = root / "tamper" / "plan.json"
    plan.parent.mkdir()
    plan.write_text("{}")
    data = site_data(root / "data")
    procs = Processes()
    try:
        for name, path in zip(HOSPITALS, data, strict=True):
            env = {PLAN_ENV: str(plan)} if name == HOSTILE else {}
            _join(procs, shared_federation.bundle(name), path, root / f"site-{name}", env)
        wait_until(lambda: online_nodes(shared_coordinator) >= set(HOSPITALS), 150, "the three hospitals online")
        yield HostileDeployment(shared_coordinator, root, plan)
    finally:
        procs.stop_all()


def _job(root: Path, name: str, rounds: int, extra: str = "") -> Path:
    job = write_deploy_job(root, name, rounds=rounds, min_sites=2, round_timeout=90, eval_every=1000,
                           extra_run_config=extra)
    app = tampered_app(root / "tampered-app")
    text = job.read_text().replace(f'name = "{name}"\n', f'name = "{name}"\napp = "{app}"\n', 1)
    job.write_text(text)
    return job


REJECTED = re.compile(r"round (\d+): update from (\S+) rejected: (.*)$", re.MULTILINE)


def _rejections(coordinator: CoordinatorHandle, job: str) -> dict[int, list[tuple[str, str]]]:
    result = coordinator.cli("logs", "--run", job, "--server-log")
    assert result.returncode == 0, result.stdout + result.stderr
    found: dict[int, list[tuple[str, str]]] = {}
    for match in REJECTED.finditer(result.stdout):
        found.setdefault(int(match[1]), []).append((match[2], match[3]))
    return found


def _flat(text: str) -> str:
    """CLI output with the console's line wrapping undone."""
    return " ".join(text.split())


def _rows(out: Path) -> list[dict[str, object]]:
    return list(json.loads((out / "metrics.json").read_text()))


def _round_seconds(out: Path) -> dict[int, float]:
    return {int(str(r["round"])): float(str(r["round_seconds"])) for r in _rows(out)
            if r["phase"] == "timing" and "round_seconds" in r}


def test_every_hostile_reply_is_rejected_with_its_reason_and_the_run_goes_on(
        deployment: HostileDeployment, tmp_path: Path) -> None:
    deployment.plan.write_text(json.dumps({str(r): mode for r, (mode, _) in PLAN.items()}))
    job = _job(tmp_path, "hostile-replies", ROUNDS)
    result = deployment.coordinator.cli("run", str(job), timeout=800)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"round {ROUNDS}/{ROUNDS}" in _flat(result.stdout) and "completed" in result.stdout

    out = deployment.coordinator.state_dir / "runs" / "hostile-replies"
    rejected = _rejections(deployment.coordinator, "hostile-replies")
    hostile_labels = set()
    for server_round, (mode, reason) in PLAN.items():
        lines = rejected.get(server_round, [])
        if reason is None:
            assert not lines, (server_round, lines)
            continue
        assert len(lines) == 1 and reason in lines[0][1], (server_round, mode, lines)
        hostile_labels.add(lines[0][0])
    assert len(hostile_labels) == 1  # always the same site, and only that one

    # Accepted updates per round: all three in round 1, the two honest sites in every attacked round.
    trained = Counter(int(str(r["round"])) for r in _rows(out) if r["phase"] == "train")
    assert trained == {1: 3, **{r: 2 for r in range(2, ROUNDS + 1)}}, trained
    overview = json.loads(deployment.coordinator.cli("logs", "--run", "hostile-replies", "--json").stdout)
    kinds = {r["round"]: [x["kind"] for x in r["rejected"]] for r in overview["rounds"]}
    assert kinds[2] == ["invalid update (bad example count)"] and kinds[9] == ["invalid update (stale reply)"]

    # The honest sites' model is finite, and is what gets exported.
    exported = tmp_path / "export"
    export = deployment.coordinator.cli("export", "hostile-replies", "--out", str(exported))
    assert export.returncode == 0, export.stdout + export.stderr
    from visionfm_core.models.checkpoint import load_encoder

    state, _ = load_encoder(exported / "fundus.safetensors")
    assert all(bool(t.isfinite().all()) for t in state.values())
    norm = float(np.sqrt(sum(float((t.double() ** 2).sum()) for t in state.values())))
    assert norm < 1e3, norm  # an accepted +1e4 shift would have made it about 6e5

    # --resume after such rounds: one more round, honest again, with all three sites.
    resumed_job = _job(tmp_path, "hostile-replies", ROUNDS + 1)
    started = time.monotonic()
    resumed = deployment.coordinator.cli("run", str(resumed_job), "--resume", timeout=400)
    resume_seconds = time.monotonic() - started
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming after round {ROUNDS})" in _flat(resumed.stdout) and "completed" in resumed.stdout
    trained = Counter(int(str(r["round"])) for r in _rows(out) if r["phase"] == "train")
    assert trained[ROUNDS + 1] == 3

    seconds = _round_seconds(out)
    print("\nround  hospital C sends         coordinator logs (hospital C's reply)                       round s")
    for server_round in sorted(seconds):
        mode, reason = PLAN.get(server_round, ("honest (resumed run)", None))
        print(f"{server_round:>5}  {mode:<23}  {(reason or 'accepted')[:60]:<60} {seconds[server_round]:7.1f}")
    print(f"--resume after round {ROUNDS} to round {ROUNDS + 1} completed: {resume_seconds:.1f} s (submit to finish)")


def test_rounds_without_enough_good_updates_fail_the_run_and_resume_recovers(
        deployment: HostileDeployment, tmp_path: Path) -> None:
    """With every site required (min-sites 3), hospital C's bad replies leave each round without enough
    accepted updates: after max-failed-rounds = 2 such rounds the run stops as failed with the reason and
    its last good checkpoint, instead of reporting `completed`; once C behaves, --resume finishes."""
    deployment.plan.write_text(json.dumps({"1": "count-nan", "2": "count-nan"}))
    job = write_deploy_job(tmp_path, "hostile-failing", rounds=3, min_sites=3, round_timeout=90, eval_every=1000,
                           extra_run_config="max-failed-rounds = 2\n")
    app = tampered_app(tmp_path / "tampered-app")
    job.write_text(job.read_text().replace('name = "hostile-failing"\n', f'name = "hostile-failing"\napp = "{app}"\n'))
    failed = deployment.coordinator.cli("run", str(job), timeout=600)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    output = _flat(failed.stdout + failed.stderr)
    assert "failed: round 2: 2 round(s) in a row without enough accepted updates to aggregate" in output, output
    assert "last good checkpoint: round 1" in output, output
    out = deployment.coordinator.state_dir / "runs" / "hostile-failing"
    assert not (out / "encoders").exists() and not (out / "checkpoints" / "round-0002").exists()
    status = deployment.coordinator.cli("status")
    assert "finished:failed" in status.stdout, status.stdout

    deployment.plan.write_text("{}")
    started = time.monotonic()
    resumed = deployment.coordinator.cli("run", str(job), "--resume", timeout=600)
    recovery = time.monotonic() - started
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming after round 1)" in _flat(resumed.stdout) and "completed" in resumed.stdout
    assert not (out / "failure.json").exists() and (out / "encoders" / "fundus.safetensors").is_file()
    print(f"\nfailed run -> --resume to completion (rounds 2-3, all sites): {recovery:.1f} s")
