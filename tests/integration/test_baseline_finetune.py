"""The centralized and local-only arms run the fine-tuning phase too, so `visionfm simulate --mode all`
compares fine-tuned models: optic-disc landmarks on the bundled HRF set, in-process (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from server.federation.finetune_phase import resolve_finetune_task
from simulations.baseline_finetune import site_tasks
from simulations.simulate import simulate
from strategies.protocol.scenario import load_scenario, resolve_config

pytestmark = pytest.mark.integration

FAST = {"num-rounds": 1, "local-steps": 1, "finetune-rounds": 2, "finetune-data": "hrf-disc",
        "finetune-batch-size": 4, "finetune-min-steps": 0}
SITES = ("hospital-a", "hospital-b", "hospital-c")


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def centralized(tmp_path_factory: pytest.TempPathFactory):
    return simulate("quick", "centralized", tmp_path_factory.mktemp("arms") / "centralized", overrides=FAST)


def test_centralized_arm_fine_tunes_on_every_sites_samples_pooled(centralized) -> None:
    rows = _rows(centralized.out_dir)
    trained = [r for r in rows if r["phase"] == "finetune"]
    # Fine-tune rounds follow the one pretraining round, as in a federation.
    assert [(r["round"], r["site"], r["finetune_round"]) for r in trained] == [(2, "centralized", 1),
                                                                               (3, "centralized", 2)]
    scenario = str(centralized.out_dir / "scenario.json")
    cfg = resolve_finetune_task(resolve_config(load_scenario(scenario), scenario, FAST))
    shares = [site_tasks(cfg, i)["fundus"].train for i in range(3)]
    assert trained[0]["num_examples"] == sum(map(len, shares))  # every site's training share, pooled
    held_out = [r for r in rows if r["phase"] == "finetune-evaluate" and r["site"] == "centralized:global-test"]
    assert [r["finetune_round"] for r in held_out] == [1, 2] and all(r["mre"] > 0 for r in held_out)
    assert all(np.isfinite(r["finetune_loss"]) for r in trained)
    assert "fine-tuning rounds (landmarks)" in (centralized.out_dir / "report.md").read_text()


def test_local_arm_fine_tunes_the_given_encoders_at_each_site_alone(centralized, tmp_path: Path) -> None:
    overrides = {**FAST, "init-encoders": str(centralized.out_dir / "encoders")}
    out = simulate("quick", "local", tmp_path / "local", overrides=overrides).out_dir
    rows = _rows(out)
    assert not [r for r in rows if r["phase"] == "train"]  # given encoders: no pretraining
    trained = {(r["round"], r["site"]) for r in rows if r["phase"] == "finetune"}
    assert trained == {(ft_round, site) for ft_round in (1, 2) for site in SITES}
    held_out = {r["site"] for r in rows if r["phase"] == "finetune-evaluate" and r["finetune_round"] == 2}
    assert {f"{site}:global-test" for site in SITES} <= held_out
