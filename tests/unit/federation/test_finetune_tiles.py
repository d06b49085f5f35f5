"""Federated fine-tuning of a dense task goes through `visionfm finetune`'s pipeline: the fundus field of
view, training on tiles at the working scale, whole photographs scored at their own pixels, and the
decision threshold the sites' validation chose (which the server's held-out test is scored with)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from client.finetuning import finetune_evaluate, finetune_round
from client.site import load_site_tasks
from server.federation.finetune_phase import (
    finetune_arrays,
    resolve_finetune_task,
    task_test_evaluator,
    validation_threshold,
)
from server.federation.report import MetricsLog
from simulations.compare import finetune_rows, write_comparison
from strategies.protocol.task_models import build_task_model, new_tuner, task_preprocess
from tests.csv_files import write_csv
from tests.synthetic_fundus import synthetic_fundus
from visionfm_core.data.preprocess import fast_fundus_fov
from visionfm_core.data.readers import read_image
from visionfm_core.errors import ConfigError
from visionfm_core.pretraining import initial_global_arrays, modality_arrays
from visionfm_core.run_config import RunConfig

SETTINGS = json.dumps({"num_classes": 2, "class_names": ["background", "vessel"], "features": 4})
BASE = {"num-rounds": 1, "local-steps": 1, "batch-size": 8, "arch": "nano", "image-size": 32, "patch-size": 8,
        "modalities": "fundus", "finetune-rounds": 2, "finetune-task": "segmentation", "finetune-min-steps": 0,
        "finetune-task-config": SETTINGS, "ssl.out-dim": 32, "ssl.head-hidden-dim": 32,
        "ssl.head-bottleneck-dim": 16, "ssl.local-crops": 0,
        # Tiny photographs: tiles at each image's own resolution (the task's other defaults apply).
        "finetune-preprocess": '{"fov_diameter": 0}'}
SIZES = [(60, 80), (72, 64), (50, 90), (64, 64), (56, 72), (70, 70)]


def _photograph(folder: Path, number: int, size: tuple[int, int]) -> dict[str, str]:
    """A bright disc (the field of view) on black with dark horizontal 'vessels', and their mask."""
    image, vessels = synthetic_fundus(size, number)
    Image.fromarray(image).save(folder / f"eye{number}.png")
    Image.fromarray((vessels * 255).astype(np.uint8)).save(folder / f"eye{number}_mask.png")
    return {"image": f"eye{number}.png", "mask": f"eye{number}_mask.png"}


@pytest.fixture
def site(tmp_path: Path) -> dict[str, object]:
    rows = [_photograph(tmp_path, number, size) for number, size in enumerate(SIZES)]
    manifest = write_csv(tmp_path / "vessels.csv", rows)
    return {"data-path": str(tmp_path), "modalities": "fundus", "task-manifest": f"fundus={manifest}"}


def _config(**changes: object) -> RunConfig:
    return resolve_finetune_task(RunConfig.from_flat({**BASE, **{k.replace("_", "-"): v for k, v in changes.items()}}))


def test_a_federated_segmentation_round_trains_on_tiles_and_scores_whole_photographs(
        site: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(finetune_epochs=1, finetune_batch_size=32)
    tasks = load_site_tasks(site, cfg)
    train, val = tasks["fundus"].train, tasks["fundus"].val
    tuner = new_tuner(cfg, "fundus", torch.device("cpu"))
    preprocess = task_preprocess(cfg, tuner.task, "fundus")
    assert preprocess.tiles and preprocess.fov_crop and preprocess.image_size == 32  # finetune's pipeline
    assert tuner.config.batch_size == tuner.task.max_batch_size == 8  # a batch of tiles, as finetune caps it
    sent = {k: torch.from_numpy(v) for k, v in
            finetune_arrays({k: v.numpy() for k, v in initial_global_arrays(cfg).items()}, cfg).items()}
    result = finetune_round(tasks, sent, cfg, 1, {})
    # An epoch is crops_per_image tiles of every training photograph (whole letterboxed images would
    # be one step: fewer images than a batch).
    assert result.metrics["fundus/steps"] == len(train) * preprocess.crops_per_image // 8
    assert 0.0 < result.metrics["fundus/val-best_threshold"] < 1.0

    # The validation score is the Dice of the masks at each photograph's own size.
    arrays = {**sent, **result.arrays}
    scores = finetune_evaluate(tasks, arrays, cfg, {})
    shared = modality_arrays(arrays, "fundus")
    head = {k.split(".", 1)[1]: v for k, v in shared.items() if k.startswith("classifier.")}
    model = build_task_model(tuner, cfg, shared, head, "fundus")
    # Scored as the saved model predicts: with test-time flips (the segmentation default), so the
    # threshold this validation chooses is the one for the flip-averaged scores.
    assert preprocess.test_flips
    predictions = tuner.predict(model, tuner.loader(val, preprocess, train=False, with_targets=False), flips=True)
    counts = np.zeros(3)
    for prediction in predictions:
        sample = val[prediction["index"]]
        image = read_image(sample.source)
        truth = np.asarray(Image.open(str(sample.mask))) > 0
        predicted = prediction["mask"] > 0
        assert predicted.shape == image.shape[:2]  # the source's pixels, not the network's
        assert not predicted[~fast_fundus_fov(image)].any()  # background outside the field of view
        counts += [(predicted & truth).sum(), (predicted & ~truth).sum(), (~predicted & truth).sum()]
    expected = 2 * counts[0] / (2 * counts[0] + counts[1] + counts[2])
    assert scores["fundus/dice"] == pytest.approx(expected, abs=1e-9)
    assert scores["fundus/count"] == len(val)

    # The server scores its held-out test the same way (here on the same photographs): flip-averaged.
    evaluate = task_test_evaluator(cfg)
    monkeypatch.setattr(evaluate, "test_samples", lambda modality: val)
    evaluate.thresholds["fundus"] = float(tuner.task.threshold)
    assert evaluate({k: v.numpy() for k, v in arrays.items()})["fundus"]["dice"] == pytest.approx(expected, abs=1e-9)


def test_the_server_scores_the_held_out_test_with_the_sites_validation_threshold() -> None:
    # Weighted by validation images; a site's hostile or broken claim is ignored, not trusted.
    assert validation_threshold([(0.3, 1), (0.6, 2)], 100) == pytest.approx(0.5)
    hostile = [(0.4, 3), (7.0, 5), (float("nan"), 2), (0.9, -1), (0.2, float("inf"))]
    assert validation_threshold(hostile, 100) == pytest.approx(0.4)
    # A count above the coordinator's cap would buy the whole weight: that claim is ignored too.
    assert validation_threshold([(0.4, 3), (0.9, 1e12)], 100) == pytest.approx(0.4)
    assert validation_threshold([], 100) is None
    cfg = _config(finetune_data="hrf-vessels", finetune_task_config="", scenario="quick",
                  finetune_preprocess='{"fov_diameter": 48, "test_flips": false}')
    evaluate = task_test_evaluator(cfg)
    arrays = finetune_arrays({k: v.numpy() for k, v in initial_global_arrays(cfg).items()}, cfg)
    evaluate.thresholds["fundus"] = 0.37
    scores = evaluate(arrays)["fundus"]
    assert scores["threshold"] == 0.37 and scores["count"] == len(evaluate.test_samples("fundus"))
    assert "best_threshold" not in scores  # the test never picks its own threshold


def test_bad_preprocessing_overrides_are_errors_naming_the_key() -> None:
    for value in ('{"image_size": 64}', '{"tile_size": 3}', "[1]", "{not json"):
        with pytest.raises(ConfigError) as raised:
            _config(finetune_preprocess=value)
        assert raised.value.key == "finetune-preprocess"


def test_the_all_modes_comparison_shows_the_dense_tasks_held_out_dice_per_arm(tmp_path: Path) -> None:
    logs = {}
    for mode, arms in (("federated", {"global-test": 0.61}), ("centralized", {"centralized:global-test": 0.7}),
                       ("local", {"hospital-a:global-test": 0.4, "hospital-b:global-test": 0.5})):
        log = MetricsLog(tmp_path / mode)
        for site, dice in arms.items():
            log.add(2, site, "fundus", "finetune-evaluate", {"dice": dice - 0.1, "finetune-round": 1})
            log.add(3, site, "fundus", "finetune-evaluate", {"dice": dice, "threshold": 0.4, "finetune-round": 2})
            validated = site.split(":")[0] if ":" in site else "hospital-a"  # a site's own validation split
            log.add(3, validated, "fundus", "finetune-evaluate", {"dice": 0.99, "finetune-round": 2})
        logs[mode] = log
    tuned = finetune_rows(logs)
    assert {(r["mode"], r["arm"], r["dice"]) for r in tuned} == {
        ("federated", "federated", 0.61), ("centralized", "centralized", 0.7), ("local", "hospital-a", 0.4),
        ("local", "hospital-b", 0.5)}  # held-out test only (never a site's validation), last round
    text = write_comparison(tmp_path, [], tuned).read_text()
    assert "| mode | arm | modality | Dice | threshold |" in text
    assert "| local | hospital-b | fundus | 0.500 | 0.400 |" in text
    assert json.loads((tmp_path / "comparison-finetune.json").read_text()) == tuned
