"""Federated fine-tuning of the other tasks (segmentation, landmarks, detection) through the real
ClientApp: the bundled task sets shared out to simulated sites, and a site's own CSV manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from PIL import Image

from client.app import app as client_app
from client.finetuning import finetune_round
from client.site import load_site_tasks
from server.federation.finetune_phase import FineTunePhase, finetune_arrays, resolve_finetune_task, task_test_evaluator
from strategies.protocol.records import arrays_to_record, record_to_numpy
from strategies.protocol.task_models import CLASSIFIER_PREFIX
from strategies.protocol.task_sets import TASK_SETS, load_task_set, site_share
from tests.csv_files import write_csv
from visionfm_core.errors import ConfigError
from visionfm_core.models.checkpoint import load_encoder
from visionfm_core.pretraining import initial_global_arrays
from visionfm_core.run_config import RunConfig

BASE = {"num-rounds": 1, "local-steps": 1, "batch-size": 8, "arch": "nano", "image-size": 32, "patch-size": 8,
        "modalities": "fundus", "scenario": "quick", "finetune-rounds": 2, "finetune-batch-size": 8,
        "finetune-min-steps": 0,
        "ssl.out-dim": 32, "ssl.head-hidden-dim": 32, "ssl.head-bottleneck-dim": 16, "ssl.local-crops": 0,
        # Tiles of 32 px at the default working scale (a field of view 1024 px wide) would be thousands per
        # photograph: a small working scale keeps the tiled, source-resolution path but a few tiles each.
        # Test-time flips (4x the scoring) are tested in test_finetune_tiles.py; not needed here.
        "finetune-preprocess": '{"fov_diameter": 64, "test_flips": false}'}
HEADLINE = {"hrf-vessels": "dice", "hrf-disc": "mre", "idrid-disc": "map50"}


def _config(**changes: object) -> RunConfig:
    return resolve_finetune_task(RunConfig.from_flat({**BASE, **{k.replace("_", "-"): v for k, v in changes.items()}}))


def _global(cfg: RunConfig) -> dict[str, np.ndarray]:
    return finetune_arrays({k: v.numpy() for k, v in initial_global_arrays(cfg).items()}, cfg)


def _context(partition: int = 0, **node_config: object) -> Context:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 3
    config = {"partition-id": partition} if not node_config else dict(node_config)
    return Context(run_id=1, node_id=3, node_config=config, state=RecordDict(), run_config={})  # type: ignore[arg-type]


def _reply(cfg: RunConfig, arrays: dict[str, np.ndarray], context: Context,
           message_type: str = MessageType.TRAIN) -> Message:
    config = ConfigRecord({**cfg.to_flat(), "server-round": 1})
    msg = Message(RecordDict({"arrays": arrays_to_record(arrays), "config": config}), dst_node_id=3,
                  message_type=message_type)
    reply = client_app(msg, context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return reply


def test_a_bundled_task_set_sets_the_task_and_its_settings() -> None:
    cfg = _config(finetune_data="hrf-vessels")
    assert cfg.finetune_task == "segmentation" and cfg.phase == "finetune"
    assert cfg.finetune_task_settings()["class_names"] == ["background", "vessel"]
    assert RunConfig.from_flat(cfg.to_flat()) == cfg
    head = {k for k in _global(cfg) if CLASSIFIER_PREFIX in k}
    assert head and all(k.startswith("fundus/") for k in head)


@pytest.mark.parametrize(("changes", "key"), [
    ({"finetune_data": "hrf-vessels", "finetune_task": "landmarks"}, "finetune-task"),
    ({"finetune_data": "retina-vessels"}, "finetune-data"),
    ({"finetune_data": "hrf-vessels", "modalities": "oct"}, "finetune-data"),
    ({"finetune_task": "segmentation"}, "finetune-task-config"),
    ({"finetune_task": "landmarks", "finetune_task_config": '{"num_points": 0}'}, "finetune-task-config"),
    ({"finetune_task": "detection", "finetune_task_config": '{"colour": 1}'}, "finetune-task-config"),
])
def test_a_task_that_cannot_be_built_is_an_error_naming_the_key(changes: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        _config(**changes)
    assert raised.value.key == key


@pytest.mark.parametrize("name", sorted(TASK_SETS))
def test_task_set_shares_are_disjoint_cover_the_pool_and_never_hold_test_patients(name: str) -> None:
    task_set = load_task_set(name)
    shares = [site_share(task_set, 3, i) for i in range(3)]
    sources = sorted(s.source for share in shares for s in share)
    assert sources == sorted(s.source for s in task_set.pool)  # disjoint and complete
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # equal shares
    test_patients = {s.item.patient_key for s in task_set.test}
    assert test_patients and not test_patients & {s.item.patient_key for s in task_set.pool}


@pytest.mark.parametrize("name", sorted(TASK_SETS))
def test_a_sites_round_trains_and_scores_the_task(name: str) -> None:
    cfg = _config(finetune_data=name, finetune_epochs=1)
    sent = _global(cfg)
    site = load_site_tasks({"partition-id": 2}, cfg)
    assert set(site) == {"fundus"} and site["fundus"].train and site["fundus"].val
    result = finetune_round(site, {k: torch.from_numpy(v) for k, v in sent.items()}, cfg, 1, {})
    assert set(result.arrays) == set(sent)
    changed = [k for k in sent if not np.allclose(result.arrays[k].numpy(), sent[k])]
    assert any(CLASSIFIER_PREFIX in k for k in changed) and any("/backbone." in k for k in changed)
    assert result.metrics["fundus/num-examples"] == len(site["fundus"].train)
    headline = result.metrics[f"fundus/val-{HEADLINE[name]}"]
    assert np.isfinite(headline)
    if name == "hrf-vessels":  # whole photographs scored at their own pixels: Dice, and the best threshold
        assert 0.0 < result.metrics["fundus/val-best_threshold"] < 1.0
    else:
        assert np.isfinite(result.metrics["fundus/val-task-loss"])


def test_a_site_without_the_task_sets_modality_trains_nothing(tmp_path: Path) -> None:
    scenario = tmp_path / "oct_and_fundus.toml"
    scenario.write_text('[datasets]\noct = "oct2017"\nfundus = "retinamnist"\n[[sites]]\nname = "a"\n'
                        'modalities = ["oct"]\n[[sites]]\nname = "b"\nmodalities = ["fundus"]\n')
    cfg = _config(finetune_data="hrf-vessels").replace(scenario=str(scenario))
    assert load_site_tasks({"partition-id": 0}, cfg) == {}
    assert len(load_site_tasks({"partition-id": 1}, cfg)["fundus"].train) > 20


def test_segmentation_reply_holds_weights_and_numbers_only_and_evaluation_scores_dice() -> None:
    cfg = _config(finetune_data="hrf-vessels")
    context = _context(partition=1)
    reply = _reply(cfg, _global(cfg), context)
    sent = record_to_numpy(reply.content.array_records["arrays"])
    assert sent and all(v.dtype == np.float32 for v in sent.values())
    payload = b"".join(record.deflate() for record in reply.content.values()) + reply.content.deflate()
    for fragment in (b"hrf", b"images", b".jpg", b"manual1", b"_dr", b"_g"):
        assert fragment not in payload, fragment
    metrics = dict(reply.content.metric_records["metrics"])
    assert 0.0 <= float(metrics["fundus/val-dice"]) <= 1.0  # type: ignore[arg-type]
    evaluated = _reply(cfg, _global(cfg), context, MessageType.EVALUATE)
    scores = dict(evaluated.content.metric_records["metrics"])
    assert {"fundus/dice", "fundus/iou", "fundus/dice_vessel"} <= set(scores)


def _write_manifest(folder: Path, count: int) -> Path:
    """A site's own segmentation data: small photographs with a disc-shaped mask each."""
    rows = []
    rng = np.random.default_rng(0)
    for i in range(count):
        image = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
        mask = np.zeros((48, 64), np.uint8)
        mask[10 + i % 5:30, 20:40] = 255
        Image.fromarray(image).save(folder / f"img{i}.png")
        Image.fromarray(mask).save(folder / f"img{i}_mask.png")
        rows.append({"image": f"img{i}.png", "mask": f"img{i}_mask.png"})
    return write_csv(folder / "segmentation.csv", rows)


def test_a_deployed_site_reads_its_task_manifest(tmp_path: Path) -> None:
    manifest = _write_manifest(tmp_path, 10)
    cfg = _config(finetune_task="segmentation", finetune_task_config='{"num_classes": 2}', scenario="")
    node = {"data-path": str(tmp_path), "modalities": "fundus", "task-manifest": str(manifest)}
    site = load_site_tasks(node, cfg)
    assert len(site["fundus"].train) + len(site["fundus"].val) == 10 and site["fundus"].val
    reply = _reply(cfg, _global(cfg), _context(**node))
    metrics = dict(reply.content.metric_records["metrics"])
    assert metrics["fundus/num-examples"] == len(site["fundus"].train)
    with pytest.raises(ConfigError) as raised:
        load_site_tasks({"data-path": str(tmp_path), "modalities": "fundus"}, cfg)
    assert raised.value.key == "task-manifest"


def test_a_deployed_site_fine_tunes_a_regression_from_its_manifest(tmp_path: Path) -> None:
    _write_manifest(tmp_path, 8)
    manifest = tmp_path / "ratios.csv"
    manifest.write_text("image,cup_disc_ratio\n" + "".join(f"img{i}.png,{0.3 + 0.05 * i}\n" for i in range(8)))
    settings = '{"num_targets": 1, "target_names": ["cup_disc_ratio"], "mean": [0.5], "std": [0.2]}'
    cfg = _config(finetune_task="regression", finetune_task_config=settings, scenario="")
    node = {"data-path": str(tmp_path), "modalities": "fundus", "task-manifest": f"fundus={manifest}"}
    reply = _reply(cfg, _global(cfg), _context(**node))
    metrics = dict(reply.content.metric_records["metrics"])
    assert float(metrics["fundus/val-mae"]) >= 0.0 and "fundus/val-mae_cup_disc_ratio" in metrics  # type: ignore[arg-type]


def test_server_averages_task_heads_scores_the_held_out_part_and_saves_the_task(tmp_path: Path) -> None:
    cfg = _config(finetune_data="hrf-disc", out_dir=str(tmp_path))
    phase = FineTunePhase(None, cfg, {k: v.numpy() for k, v in initial_global_arrays(cfg).items()},  # type: ignore[arg-type]
                          round_offset=1)
    updates = [phase._site_update(1, f"site-{i}", _reply(phase.cfg, phase.arrays, _context(partition=i)))
               for i in (0, 1)]
    assert all(u is not None for u in updates)
    rows = phase.metrics.select(phase="finetune", round=2)
    assert {r["site"] for r in rows} == {"site-0", "site-1"} and all(np.isfinite(r["val_mre"]) for r in rows)
    scores = task_test_evaluator(phase.cfg)(phase.arrays)
    assert set(scores) == {"fundus"} and scores["fundus"]["mre"] > 0 and scores["fundus"]["count"] > 0
    phase._save_models(tmp_path / "finetuned", round=1)
    state, meta = load_encoder(tmp_path / "finetuned" / "fundus.classifier.safetensors")
    assert meta["task"] == "landmarks" and json.loads(meta["task_config"])["point_names"] == ["optic_disc"]
    assert state and "num_classes" not in meta


def test_a_task_that_cannot_be_built_stops_the_run_before_pretraining() -> None:
    from server.federation.app import run_federation

    cfg = RunConfig.from_flat({**BASE, "finetune-task": "landmarks", "finetune-task-config": '{"num_points": 0}'})
    with pytest.raises(ConfigError) as raised:
        run_federation(None, cfg)  # type: ignore[arg-type]  # no grid: nothing may have been sent yet
    assert raised.value.key == "finetune-task-config"


def test_a_task_manifest_value_names_one_csv_or_one_per_modality(tmp_path: Path) -> None:
    from client.cli import _absolute_manifests
    from client.site import task_manifest_entries

    assert task_manifest_entries("vessels.csv") == [("", "vessels.csv")]
    assert task_manifest_entries("fundus=a.csv, oct=b.csv") == [("fundus", "a.csv"), ("oct", "b.csv")]
    for bad in ("a.csv,b.csv", "fundus=", "=a.csv"):
        with pytest.raises(ConfigError) as raised:
            task_manifest_entries(bad)
        assert raised.value.key == "task-manifest", bad
    relative = Path(tmp_path.name) / "a.csv"
    assert _absolute_manifests(f"fundus={relative}") == f"fundus={relative.resolve()}"
    assert _absolute_manifests(str(relative)) == str(relative.resolve())
