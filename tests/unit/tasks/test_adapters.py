"""Each task adapter: targets, loss, decoding back to source pixels, metrics, on real bundled data."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from tests.unit.tasks.helpers import DATA, retinamnist, tiny_encoder
from visionfm_core.data.items import ImageItem, items_from_arrays
from visionfm_core.errors import ConfigError, DataError
from visionfm_core.evaluation.task_metrics import box_iou
from visionfm_core.tasks.adapters import (
    ClassificationTask,
    DetectionTask,
    LandmarkTask,
    RegressionTask,
    SegmentationTask,
    task_from_config,
)
from visionfm_core.tasks.data import Preprocess, collate
from visionfm_core.tasks.geometry import letterbox
from visionfm_core.tasks.public_sets import hrf_optic_disc, hrf_samples, idrid_disc_encoding, idrid_optic_disc
from visionfm_core.tasks.samples import TaskSample
from visionfm_core.tasks.trainer import FineTuneConfig, FineTuner

FIXED: dict[str, Any] = {"max_zoom": 1.0, "flip": False, "jitter": 0.0}


def _batch(task: object, samples: list[TaskSample], preprocess: Preprocess) -> dict:
    tuner = FineTuner(task, FineTuneConfig(batch_size=len(samples)))  # type: ignore[arg-type]
    return next(iter(tuner.loader(samples, preprocess, train=False)))


# --- classification ---------------------------------------------------------------------------------


def test_balanced_class_weights_are_inverse_frequency() -> None:
    task = ClassificationTask(3, class_weighting="balanced")
    task.fit_to_data([TaskSample(ImageItem(str(i)), label=label) for i, label in enumerate([0, 0, 0, 1])])
    # counts 3, 1, 0 -> 4/(3*3), 4/(1*3); an absent class keeps weight 1.
    assert task.weights == pytest.approx([4 / 9, 4 / 3, 1.0])


def test_multilabel_loss_and_metrics() -> None:
    task = ClassificationTask(2, mode="multilabel")
    logits = torch.tensor([[5.0, -5.0], [-5.0, 5.0], [5.0, 5.0], [-5.0, -5.0]])
    batch = {"labels": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])}
    assert float(task.loss(logits, batch)) < 0.01
    assert float(task.loss(-logits, batch)) > 4.0
    meter = task.meter()
    meter.update(logits, batch)
    assert meter.compute() == {"count": 4.0, "auc": 1.0, "accuracy": 1.0, "f1": 1.0}
    assert task.predictions(logits, batch)[2]["labels"] == ["0", "1"]


def test_ordinal_task_reports_kappa_and_ci_on_real_retinamnist() -> None:
    task = ClassificationTask(5, mode="ordinal", bootstrap_resamples=50)
    tuner = FineTuner(task, FineTuneConfig(regime="frozen", epochs=1, batch_size=16))
    result = tuner.fit(
        tiny_encoder(), retinamnist("train", 48), retinamnist("val", 40), Preprocess.for_modality("fundus", 32)
    )
    assert {"auc", "accuracy", "f1", "kappa", "auc_ci_low", "auc_ci_high", "loss"} <= set(result.best_validation)
    assert 0.0 <= result.best_validation["auc"] <= 1.0


def test_classification_checks_labels_and_config() -> None:
    with pytest.raises(DataError, match=r"a\.png"):
        ClassificationTask(2).check([TaskSample(ImageItem("a.png"), label=7)])
    with pytest.raises(ConfigError, match="mode"):
        ClassificationTask(2, mode="fuzzy")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="class_names"):
        ClassificationTask(3, class_names=("a", "b"))


def test_tasks_round_trip_through_their_config() -> None:
    tasks = [
        ClassificationTask(3, "ordinal", ("a", "b", "c"), class_weighting="balanced", weights=[1.0, 2.0, 3.0]),
        SegmentationTask(2, ("bg", "disc"), idrid_disc_encoding()),
        LandmarkTask(2, ("fovea", "disc")),
        DetectionTask(1, ("disc",)),
        RegressionTask(1, ("hba1c",), mean=[6.0], std=[1.5]),
    ]
    for task in tasks:
        assert task_from_config(task.kind, task.to_config()) == task


# --- segmentation -----------------------------------------------------------------------------------


def test_segmentation_loss_prefers_the_true_mask_and_ignores_outside_fov() -> None:
    task = SegmentationTask(2)
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 2:6, 2:6] = 1
    target[0, 0] = 255
    right = torch.stack([(target != 1).float(), (target == 1).float()], 1) * 10
    assert float(task.loss(right, {"mask": target})) < float(task.loss(-right, {"mask": target}))
    everything_ignored = torch.full_like(target, 255)
    assert math.isfinite(float(task.loss(right, {"mask": everything_ignored})))


def test_hrf_vessel_segmentation_end_to_end_at_source_resolution() -> None:
    samples = hrf_samples(DATA / "hrf", with_vessels=True)
    task = SegmentationTask(2, ("background", "vessel"), features=4)
    preprocess = Preprocess.for_modality("fundus", 64, **FIXED)
    tuner = FineTuner(task, FineTuneConfig(epochs=1, batch_size=2))
    result = tuner.fit(tiny_encoder(64), samples[:2], samples[2:3], preprocess)
    assert {"dice", "iou", "dice_per_image", "dice_vessel"} <= set(result.best_validation)
    batch = _batch(task, samples[:1], preprocess)
    assert int((batch["mask"] == 255).sum()) > 64 * 16  # letterbox bars and outside the field of view
    predictions = tuner.predict(result.model, tuner.loader(samples[:1], preprocess, False, with_targets=False))
    assert predictions[0]["mask"].shape == (1168, 1752)  # the photograph's own size
    assert set(predictions[0]["area_fraction"]) == {"background", "vessel"}


def test_colour_coded_idrid_disc_masks_train() -> None:
    samples = idrid_optic_disc(DATA / "idrid_seg")
    task = SegmentationTask(2, ("background", "optic_disc"), idrid_disc_encoding(), features=4)
    batch = _batch(task, samples[:2], Preprocess.for_modality("fundus", 64, **FIXED))
    disc_share = float((batch["mask"] == 1).float().mean())
    assert 0.005 < disc_share < 0.1


# --- landmarks --------------------------------------------------------------------------------------


def test_soft_argmax_decodes_a_peak_to_source_pixels() -> None:
    task = LandmarkTask(1)
    window = letterbox(100, 200, 64)
    heat = torch.full((1, 1, 16, 16), -30.0)
    heat[0, 0, 9, 4] = 30.0  # cell centre (4.5, 9.5) * stride 4 = (18, 38) input px
    batch = {
        "image": torch.zeros(1, 3, 64, 64),
        "window": window.as_tensor()[None],
        "points": torch.tensor([[[18.0, 38.0]]]),
    }
    predicted, truth = task.source_points(heat, batch)
    expected = window.to_source(np.array([18.0, 38.0]))
    assert predicted[0, 0] == pytest.approx(expected, abs=1e-3)
    assert truth[0, 0] == pytest.approx(expected, abs=1e-3)
    elsewhere = torch.full_like(heat, -30.0)
    elsewhere[0, 0, 2, 12] = 30.0
    assert float(task.loss(heat, batch)) < float(task.loss(elsewhere, batch))


def test_missing_or_out_of_view_points_carry_no_loss() -> None:
    task = LandmarkTask(2)
    heat = torch.randn(1, 2, 8, 8, requires_grad=True)
    batch = {"image": torch.zeros(1, 3, 32, 32), "points": torch.tensor([[[np.nan, np.nan], [-50.0, 10.0]]])}
    loss = task.loss(heat, batch)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(heat.grad.abs().sum()) == 0.0  # type: ignore[union-attr]


def test_hrf_optic_disc_landmarks_report_error_in_source_pixels() -> None:
    samples = hrf_optic_disc(DATA / "hrf")
    task = LandmarkTask(1, ("disc",))
    tuner = FineTuner(task, FineTuneConfig(epochs=1, batch_size=2))
    preprocess = Preprocess.for_modality("fundus", 64)
    result = tuner.fit(tiny_encoder(64), samples[:4], samples[4:6], preprocess)
    assert 0 < result.best_validation["mre"] < 2200  # within the 1752x1168 photograph's diagonal
    prediction = tuner.predict(result.model, tuner.loader(samples[:1], preprocess, False))[0]
    x, y = prediction["points"]["disc"]
    assert 0 <= x <= 1752 and 0 <= y <= 1168


# --- detection --------------------------------------------------------------------------------------


def test_detection_decodes_its_own_targets_back_to_the_boxes() -> None:
    samples = idrid_optic_disc(DATA / "idrid_seg")[:2]
    task = DetectionTask(1, ("disc",))
    batch = _batch(task, samples, Preprocess.for_modality("fundus", 64, **FIXED))
    heat, sizes, offsets = torch.full((2, 1, 8, 8), -20.0), torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 8, 8)
    for i in range(2):
        target = task._targets(batch["boxes"][i], batch["box_labels"][i], (8, 8), 64 / 8)
        x, y = target["cells"][0].tolist()
        heat[i, 0, y, x] = 20.0
        sizes[i, :, y, x], offsets[i, :, y, x] = target["sizes"][0], target["offsets"][0]
    outputs = {"heatmap": heat, "size": sizes, "offset": offsets}
    predicted, truth = task.source_boxes(outputs, batch)
    for pred, true, sample in zip(predicted, truth, samples, strict=True):
        assert box_iou(pred.boxes[:1], true.boxes)[0, 0] > 0.99
        assert true.boxes[0] == pytest.approx(sample.boxes[0], abs=1e-3)
    meter = task.meter()
    meter.update(outputs, batch)
    assert meter.compute()["map50"] == pytest.approx(1.0)
    assert float(task.loss(outputs, batch)) < float(task.loss({**outputs, "heatmap": -heat}, batch))


def test_idrid_disc_detection_trains_and_predicts_in_source_pixels() -> None:
    samples = idrid_optic_disc(DATA / "idrid_seg")
    tuner = FineTuner(DetectionTask(1, ("disc",)), FineTuneConfig(epochs=1, batch_size=4))
    preprocess = Preprocess.for_modality("fundus", 64)
    result = tuner.fit(tiny_encoder(64), samples[:8], samples[8:10], preprocess)
    assert 0.0 <= result.best_validation["map50"] <= 1.0
    boxes = tuner.predict(result.model, tuner.loader(samples[:1], preprocess, False))[0]["boxes"]
    for box in boxes:
        x0, y0, x1, y1 = box["box"]
        assert 0 <= x0 <= x1 <= 1072 and 0 <= y0 <= y1 <= 712


# --- regression -------------------------------------------------------------------------------------


def test_regression_standardises_on_train_and_reports_mae_in_units() -> None:
    rng = np.random.default_rng(0)
    brightness = rng.integers(20, 230, 24)
    images = np.broadcast_to(brightness[:, None, None, None], (24, 32, 32, 3)).astype(np.uint8)
    items = items_from_arrays(images, None, "bright")
    samples = [
        TaskSample(item, values=(float(b), float("nan") if i % 3 == 0 else float(b) / 10))
        for i, (item, b) in enumerate(zip(items, brightness, strict=True))
    ]
    task = RegressionTask(2, ("brightness", "tenth"))
    task.fit_to_data(samples[:16])
    known = [s.values[1] for s in samples[:16] if not math.isnan(s.values[1])]  # type: ignore[index]
    assert task.mean[1] == pytest.approx(np.mean(known)) and task.std[0] > 10
    tuner = FineTuner(task, FineTuneConfig(epochs=3, batch_size=8, lr=3e-3))
    result = tuner.fit(tiny_encoder(), samples[:16], samples[16:], Preprocess(32, **FIXED))
    # The model beats predicting the training mean (MAE in brightness units).
    baseline = float(np.mean([abs(b - task.mean[0]) for b in brightness[16:]]))
    assert result.best_validation["mae_brightness"] < baseline
    assert collate([{"values": torch.tensor([1.0])}, {"values": torch.tensor([2.0])}])["values"].shape == (2, 1)


def test_segmentation_requires_a_mask_per_image() -> None:
    with pytest.raises(DataError, match=r"a\.png: segmentation needs a mask"):
        SegmentationTask().check([TaskSample(ImageItem("a.png"))])
