"""Federated fine-tuning of OCT B-scans at one non-square input shape for the whole federation
(`finetune-input-aspect`): the server resamples the encoder's position embedding once to that patch
grid, every site trains at that shape through the real ClientApp and real Flower messages, the saved
global task model carries the shape into `visionfm evaluate` and `predict`, and a bad or mismatched
value is refused naming the key."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from PIL import Image
from typer.testing import CliRunner

from client.app import app as client_app
from server.federation.finetune_phase import FineTunePhase, finetune_arrays, resolve_finetune_task
from server.ops.runs import export_encoders
from strategies.protocol.records import arrays_to_record, record_to_numpy
from strategies.protocol.task_models import CLASSIFIER_PREFIX, finetune_input_shape, new_tuner, task_preprocess
from tests.unit.federation.site_grid import SiteGrid
from visionfm_core.cli import build_app
from visionfm_core.errors import ConfigError
from visionfm_core.models.checkpoint import load_encoder
from visionfm_core.pretraining import initial_global_arrays
from visionfm_core.run_config import RunConfig
from visionfm_core.tasks.aspect import input_shape
from visionfm_core.tasks.persistence import load_task_model

BASE = {"num-rounds": 1, "local-steps": 1, "batch-size": 8, "arch": "nano", "image-size": 32, "patch-size": 8,
        "modalities": "oct", "finetune-rounds": 1, "finetune-classes": "oct=2", "finetune-mode": "binary",
        "finetune-min-steps": 0, "finetune-batch-size": 4, "ssl.out-dim": 32, "ssl.head-hidden-dim": 32,
        "ssl.head-bottleneck-dim": 16, "ssl.local-crops": 0}
WIDE = (24, 48)  # OCT's federated `auto` (2:1) with the 4x4-patch budget of a 32 px square, patch 8


@pytest.fixture(autouse=True)
def private_site_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISIONFM_STATE_DIR", str(tmp_path / "state"))


def _config(**changes: object) -> RunConfig:
    return resolve_finetune_task(RunConfig.from_flat({**BASE, **changes}))


def _scans(folder: Path, count: int = 12, seed: int = 0, width: int = 110) -> Path:
    """Grey width x 44 "B-scans" (110: 2.5:1) in class folders; class dme has its bright band low."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        label = "dme" if i % 3 == 0 else "healthy"
        (folder / label).mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 50, size=(44, width), dtype=np.uint8)
        image[slice(28, 36) if label == "dme" else slice(8, 16)] = 210
        Image.fromarray(image).save(folder / label / f"scan_{i:02d}.png")
    return folder


def _node(folder: Path) -> dict[str, object]:
    return {"data-path": str(folder), "modalities": "oct"}


def _message(cfg: RunConfig, arrays: dict[str, np.ndarray], message_type: str = MessageType.TRAIN) -> Message:
    config = ConfigRecord({**cfg.to_flat(), "server-round": 1})
    return Message(RecordDict({"arrays": arrays_to_record(arrays), "config": config}), dst_node_id=3,
                   message_type=message_type)


def _context(folder: Path) -> Context:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 3
    return Context(run_id=1, node_id=3, node_config=_node(folder), state=RecordDict(), run_config={})


@pytest.mark.parametrize("value", ["wide", "0:1", "2:0", "-1.5", "nan", "oct=", "retina=2:1", "oct=2:1,=3",
                                   "oct=tall"])
def test_a_bad_input_aspect_is_refused_naming_the_key(value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        RunConfig.from_flat({**BASE, "finetune-input-aspect": value})
    assert raised.value.key == "finetune-input-aspect"


def test_the_input_height_belongs_to_the_aspect_key_not_to_the_preprocessing_overrides() -> None:
    with pytest.raises(ConfigError, match="finetune-input-aspect") as raised:
        RunConfig.from_flat({**BASE, "finetune-preprocess": '{"image_height": 16}'})
    assert raised.value.key == "finetune-preprocess"


def test_auto_is_a_fixed_per_modality_shape_and_the_coordinator_may_set_its_own() -> None:
    def shapes(cfg: RunConfig) -> dict[str, tuple[int, int]]:
        return {m: finetune_input_shape(cfg, new_tuner(cfg, m, torch.device("cpu")).task, m) for m in ("oct", "fundus")}

    both = {"modalities": "oct,fundus", "finetune-classes": "oct=2,fundus=2"}
    assert shapes(_config(**both)) == {"oct": WIDE, "fundus": (32, 32)}  # nothing measured on any site's images
    assert input_shape(2.0, 32, 8) == WIDE
    per_modality = _config(**both, **{"finetune-input-aspect": "oct=square,fundus=3:1"})
    assert shapes(per_modality) == {"oct": (32, 32), "fundus": (16, 56)}
    # The value travels in the run config as it was set; every site resolves it alike.
    assert RunConfig.from_flat(per_modality.to_flat()) == per_modality


def test_a_federated_oct_round_trains_at_the_wide_shape_and_the_global_model_keeps_it(tmp_path: Path) -> None:
    sites = [_scans(tmp_path / f"site{i}", seed=i) for i in (1, 2)]
    cfg = _config(**{"out-dir": str(tmp_path / "run")})
    pretrained = {k: v.numpy() for k, v in initial_global_arrays(cfg).items()}
    assert pretrained["oct/backbone.pos_embed"].shape[1] == 1 + 4 * 4  # pretrained on the 32 px square

    # The server resamples the position embedding once, to the 3x6 patch grid of the 24x48 input.
    sent = finetune_arrays(pretrained, cfg)
    assert sent["oct/backbone.pos_embed"].shape[1] == 1 + 3 * 6
    preprocess = task_preprocess(cfg, new_tuner(cfg, "oct", torch.device("cpu")).task, "oct")
    assert preprocess.input_shape == WIDE

    # One site's round through the real ClientApp: it trains on 24x48 batches and returns that grid.
    context = _context(sites[0])
    reply = client_app(_message(cfg, sent), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    returned = record_to_numpy(reply.content.array_records["arrays"])
    assert returned["oct/backbone.pos_embed"].shape == sent["oct/backbone.pos_embed"].shape
    assert not np.allclose(returned["oct/backbone.pos_embed"], sent["oct/backbone.pos_embed"])  # trained
    metrics = {k: float(v) for k, v in reply.content.metric_records["metrics"].items()}  # type: ignore[arg-type]
    assert metrics["oct/steps"] >= 1 and np.isfinite(metrics["oct/finetune-loss"])
    tuner = new_tuner(cfg, "oct", torch.device("cpu"))
    from client.site import load_site_tasks

    train = load_site_tasks(_node(sites[0]), cfg)["oct"].train
    batch = next(iter(tuner.loader(train, preprocess, train=True)))
    assert tuple(batch["image"].shape[-2:]) == WIDE

    # The whole phase over a grid of two such sites: aggregated, evaluated, saved with the shape.
    grid = SiteGrid({1: client_app, 2: client_app})
    for node, folder in zip((1, 2), sites, strict=True):
        grid.contexts[node].node_config.update(_node(folder))
    phase = FineTunePhase(grid, cfg, pretrained, poll_interval=0.0)  # type: ignore[arg-type]
    phase.run()
    assert not phase.rejected
    evaluated = [r for r in phase.metrics.rows if r["phase"] == "finetune-evaluate"]
    assert len(evaluated) == 2 and all(0.0 <= r["auc"] <= 1.0 for r in evaluated)
    finetuned = tmp_path / "run" / "finetuned"
    state, meta = load_encoder(finetuned / "oct.safetensors")
    assert state["pos_embed"].shape[1] == 1 + 3 * 6
    assert meta["input_shape"] == list(WIDE) and meta["timm_kwargs"]["img_size"] == list(WIDE)
    loaded = load_task_model(finetuned / "oct.task.safetensors")
    assert loaded.preprocess.input_shape == WIDE
    for key, value in phase.arrays.items():  # the saved task model is the global model
        part = "encoder." + key.split("/backbone.", 1)[1] if "/backbone." in key else None
        weights = loaded.model.encoder if part else loaded.model.head
        name = part.split(".", 1)[1] if part else key.split(f"/{CLASSIFIER_PREFIX}", 1)[1]
        np.testing.assert_allclose(weights.state_dict()[name].numpy(), value, err_msg=key)

    # The exported task model runs in `visionfm evaluate` and `visionfm predict` at its 24x48 input.
    (tmp_path / "run" / "encoders").mkdir()
    (tmp_path / "run" / "encoders" / "oct.safetensors").write_bytes((finetuned / "oct.safetensors").read_bytes())
    exported = {p.name for p in export_encoders(tmp_path / "run", tmp_path / "export")}
    assert "oct.task.safetensors" in exported
    runner, app = CliRunner(), build_app()
    model = tmp_path / "export" / "oct.task.safetensors"
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as handle:
        rows = [(str(p), p.parent.name == "dme") for p in sorted(sites[1].rglob("*.png"))]
        csv.writer(handle).writerows([("image", "label"), *[(p, int(y)) for p, y in rows]])
    result = runner.invoke(app, ["evaluate", str(model), str(labels), "--bootstrap", "0", "--threads", "1",
                                 "--device", "cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["metrics"]["count"] == len(rows)
    out = tmp_path / "predictions.csv"
    result = runner.invoke(app, ["predict", str(model), str(sites[1]), "--out", str(out), "--threads", "1",
                                 "--device", "cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with out.open(newline="") as handle:
        assert len([row for row in csv.DictReader(handle) if row.get("class_id")]) == len(rows)


def test_a_site_refuses_a_global_model_on_another_input_shape_naming_the_key(tmp_path: Path) -> None:
    site = _scans(tmp_path / "site")
    cfg = _config()
    square = finetune_arrays({k: v.numpy() for k, v in initial_global_arrays(cfg).items()},
                             cfg.replace(finetune_input_aspect="square"))
    context = _context(site)
    reply = client_app(_message(cfg, square), context)
    assert reply.has_error() and "finetune-input-aspect" in reply.error.reason
    # A value the site cannot parse is refused by name too, before any image is read.
    context = _context(site)
    bad = Message(RecordDict({"arrays": arrays_to_record(square),
                              "config": ConfigRecord({**cfg.to_flat(), "server-round": 1,
                                                      "finetune-input-aspect": "2:0"})}),
                  dst_node_id=3, message_type=MessageType.TRAIN)
    reply = client_app(bad, context)
    assert reply.has_error() and "finetune-input-aspect" in reply.error.reason


def test_the_sites_check_shows_its_own_aspect_locally_and_never_sends_it(tmp_path: Path) -> None:
    from client.preflight import check_data
    from visionfm_core.data.preflight import check_site_data

    site = _scans(tmp_path / "site", width=132)
    aspect = {c.name: c for c in check_data(site, ["oct"], decode=False)}["aspect:oct"]
    assert aspect.verdict == "warn" and "3.00:1" in aspect.message
    assert 'finetune-input-aspect = "oct=3.00"' in aspect.message
    report = check_site_data(site, "oct", decode=False)
    assert report.median_aspect == pytest.approx(3.0) and "3.00" in report.render()
    near = {c.name: c for c in check_data(_scans(tmp_path / "near", width=88), ["oct"], decode=False)}
    assert near["aspect:oct"].verdict == "ok"  # 2:1, the federation's default
    assert "aspect" not in json.dumps(report.to_public_dict())  # what may reach the coordinator
