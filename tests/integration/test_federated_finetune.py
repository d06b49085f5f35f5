"""Federated fine-tuning on Flower's simulation engine (Ray): the quick scenario's 3 sites, nano ViT.

Three simulations in all: (1) one pretraining round then two fine-tuning rounds with a trained encoder
and a shared head; (2) fine-tuning from (1)'s exported encoders with a frozen encoder and personal heads;
(3) HRF vessel segmentation from (1)'s encoders, the bundled photographs shared out to the sites.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from server.federation.finetune_phase import resolve_finetune_task
from simulations.simulate import simulate
from strategies.protocol.task_models import initial_head
from visionfm_core.models.checkpoint import load_encoder
from visionfm_core.run_config import RunConfig

pytestmark = pytest.mark.integration

SITES = ("hospital-a", "hospital-b", "hospital-c")
FAST = {"num-rounds": 1, "local-steps": 1, "finetune-rounds": 2, "finetune-mode": "ordinal",
        "finetune-batch-size": 32, "finetune-min-steps": 0}


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory: pytest.TempPathFactory):
    return simulate("quick", "federated", tmp_path_factory.mktemp("ft") / "shared", overrides=FAST)


@pytest.fixture(scope="module")
def personal_run(tmp_path_factory: pytest.TempPathFactory, shared_run):
    overrides = {**FAST, "finetune-rounds": 1, "finetune-encoder": "frozen", "finetune-head": "personal",
                 "init-encoders": str(shared_run.out_dir / "encoders")}
    return simulate("quick", "federated", tmp_path_factory.mktemp("ft") / "personal", overrides=overrides)


@pytest.fixture(scope="module")
def vessel_run(tmp_path_factory: pytest.TempPathFactory, shared_run):
    overrides = {"finetune-rounds": 2, "finetune-data": "hrf-vessels", "finetune-batch-size": 8,
                 "finetune-min-steps": 0,
                 # Tiles of 32 px: a few per photograph; test-time flips (4x the scoring) are tested in
                 # tests/unit/federation/test_finetune_tiles.py.
                 "finetune-preprocess": '{"fov_diameter": 64, "test_flips": false}',
                 "init-encoders": str(shared_run.out_dir / "encoders")}
    return simulate("quick", "federated", tmp_path_factory.mktemp("ft") / "vessels", overrides=overrides)


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())


def test_shared_head_run_logs_per_site_and_pooled_metrics_every_round(shared_run) -> None:
    rows = _rows(shared_run.out_dir)
    # Pretraining rows keep their rounds; fine-tune rounds 1-2 follow as rows 2-3.
    assert {r["round"] for r in rows if r["phase"] == "train"} == {1}
    for ft_round in (1, 2):
        trained = {(r["site"], r["modality"]) for r in rows
                   if r["phase"] == "finetune" and r["finetune_round"] == ft_round}
        assert {(s, "fundus") for s in SITES} | {("hospital-c", "oct")} <= trained
        evaluated = [r for r in rows if r["phase"] == "finetune-evaluate" and r["round"] == 1 + ft_round]
        assert {(r["site"], r["modality"]) for r in evaluated} >= {("global-test", "fundus"),
                                                                  ("global-test", "oct"), ("hospital-a", "fundus")}
        for row in evaluated:
            assert 0.0 <= row["accuracy"] <= 1.0 and "kappa" in row and "auc" in row
    assert all(np.isfinite(r["finetune_loss"]) for r in rows if r["phase"] == "finetune")
    report = (shared_run.out_dir / "report.md").read_text()
    assert "fine-tune round 2, global-test fundus" in report


def test_shared_head_is_trained_averaged_and_checkpointed(shared_run) -> None:
    out = shared_run.out_dir
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["finetune-round-0001", "finetune-round-0002", "round-0000", "round-0001"]
    cfg = resolve_finetune_task(RunConfig.from_flat(json.loads((out / "config.json").read_text())))
    start = initial_head(cfg, "fundus")["fc.weight"].numpy()
    heads = [load_encoder(out / "checkpoints" / f"finetune-round-000{r}" / "fundus.classifier.safetensors")[0]
             for r in (1, 2)]
    assert heads[0]["fc.weight"].shape == (5, start.shape[1])
    assert not np.allclose(heads[0]["fc.weight"].numpy(), start)
    assert not np.allclose(heads[1]["fc.weight"].numpy(), heads[0]["fc.weight"].numpy())
    # The trained encoder moved away from the pretrained one.
    pretrained, _ = load_encoder(out / "encoders" / "fundus.safetensors")
    tuned, meta = load_encoder(out / "finetuned" / "fundus.safetensors")
    assert meta["phase"] == "finetune"
    assert not np.allclose(tuned["blocks.0.attn.qkv.weight"].numpy(), pretrained["blocks.0.attn.qkv.weight"].numpy())


def test_personal_heads_never_reach_the_server_and_frozen_encoder_stays(personal_run, shared_run) -> None:
    out = personal_run.out_dir
    assert not list(out.rglob("*.classifier.safetensors"))
    assert not (out / "checkpoints" / "round-0000").exists()  # init-encoders: no pretraining phase
    rows = _rows(out)
    evaluated = {(r["site"], r["modality"]) for r in rows if r["phase"] == "finetune-evaluate"}
    assert {(s, "fundus") for s in SITES} | {("hospital-c", "oct")} <= evaluated
    assert not any(site == "global-test" for site, _ in evaluated)  # no pooled score without a global head
    given, _ = load_encoder(shared_run.out_dir / "encoders" / "fundus.safetensors")
    kept, _ = load_encoder(out / "checkpoints" / "finetune-round-0001" / "fundus.safetensors")
    for key, value in given.items():
        np.testing.assert_array_equal(kept[key].numpy(), value.numpy())


def test_a_fine_tune_interrupted_after_round_1_resumes_with_round_2_only(shared_run, tmp_path: Path) -> None:
    # The coordinator died after fine-tune round 1: round 2's checkpoint and rows never got written.
    out = tmp_path / "crashed"
    shutil.copytree(shared_run.out_dir, out)
    shutil.rmtree(out / "checkpoints" / "finetune-round-0002")
    rows = _rows(out)
    kept = [r for r in rows if not (r["phase"].startswith("finetune") and r["round"] >= 3)]
    (out / "metrics.json").write_text(json.dumps(kept))
    round1 = (out / "checkpoints" / "finetune-round-0001" / "fundus.classifier.safetensors").read_bytes()
    pretrained = (out / "checkpoints" / "round-0001" / "fundus.safetensors").read_bytes()

    simulate("quick", "federated", out, overrides={**FAST, "resume": True})

    assert (out / "checkpoints" / "finetune-round-0001" / "fundus.classifier.safetensors").read_bytes() == round1
    assert (out / "checkpoints" / "round-0001" / "fundus.safetensors").read_bytes() == pretrained
    assert (out / "checkpoints" / "finetune-round-0002" / "fundus.classifier.safetensors").is_file()
    rows = _rows(out)
    assert {r["round"] for r in rows if r["phase"] == "train"} == {1}  # pretraining was not repeated
    for ft_round in (1, 2):  # each fine-tune round trained once per site and modality, none twice
        trained = [(r["site"], r["modality"]) for r in rows
                   if r["phase"] == "finetune" and r["finetune_round"] == ft_round]
        assert len(trained) == len(set(trained)) and ("hospital-a", "fundus") in trained


def test_vessel_segmentation_is_fine_tuned_across_sites_and_scored_on_held_out_photographs(vessel_run) -> None:
    out = vessel_run.out_dir
    rows = _rows(out)
    for ft_round in (1, 2):
        trained = [r for r in rows if r["phase"] == "finetune" and r["finetune_round"] == ft_round]
        assert {(r["site"], r["modality"]) for r in trained} == {(s, "fundus") for s in SITES}  # no OCT task
        assert all(0.0 <= r["val_dice"] <= 1.0 and np.isfinite(r["finetune_loss"]) for r in trained)
        pooled = [r for r in rows if r["phase"] == "finetune-evaluate" and r["site"] == "global-test"
                  and r["finetune_round"] == ft_round]
        assert len(pooled) == 1 and 0.0 <= pooled[0]["dice"] <= 1.0 and pooled[0]["count"] >= 10
    heads = [load_encoder(out / "checkpoints" / f"finetune-round-000{r}" / "fundus.classifier.safetensors")
             for r in (1, 2)]
    assert heads[0][1]["task"] == "segmentation"
    assert json.loads(heads[0][1]["task_config"])["class_names"] == ["background", "vessel"]
    moved = [k for k, v in heads[1][0].items() if not np.allclose(v.numpy(), heads[0][0][k].numpy())]
    assert moved  # the averaged head changed from round 1 to round 2
    assert not (out / "checkpoints" / "finetune-round-0001" / "oct.classifier.safetensors").exists()
    assert "fine-tune round 2, global-test fundus: dice" in (out / "report.md").read_text()
