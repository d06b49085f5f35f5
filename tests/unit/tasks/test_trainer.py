"""The one fine-tuning trainer: optimiser groups, schedule, regimes, model selection, weight seams."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.unit.tasks.helpers import tiny_encoder
from visionfm_core.data.items import ImageItem, items_from_arrays
from visionfm_core.errors import ConfigError
from visionfm_core.tasks.adapters import ClassificationTask
from visionfm_core.tasks.data import Preprocess
from visionfm_core.tasks.samples import TaskSample
from visionfm_core.tasks.trainer import (
    FineTuneConfig,
    FineTuner,
    get_weights,
    learning_rate,
    parameter_groups,
    selection_score,
    set_weights,
)

PRE = Preprocess(image_size=32, max_zoom=1.0, flip=False, jitter=0.0)


def bright_dark(count: int, seed: int) -> list[TaskSample]:
    """A problem any working trainer solves: class 1 images are bright, class 0 dark (plus noise)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    images = (rng.integers(0, 60, (count, 32, 32, 3)) + 150 * labels[:, None, None, None]).astype(np.uint8)
    return [TaskSample(item, label=item.label) for item in items_from_arrays(images, labels, f"bd{seed}")]


def test_layer_wise_decay_and_no_decay_groups() -> None:
    config = FineTuneConfig(layer_decay=0.5)
    tuner = FineTuner(ClassificationTask(2), config)
    model = tuner.build_model(tiny_encoder())
    groups = parameter_groups(model, config)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale_of[id(named["head.fc.weight"])] == 1.0
    assert scale_of[id(named["encoder.norm.weight"])] == 1.0
    assert scale_of[id(named["encoder.blocks.1.attn.qkv.weight"])] == 0.5
    assert scale_of[id(named["encoder.blocks.0.attn.qkv.weight"])] == 0.25
    assert scale_of[id(named["encoder.patch_embed.proj.weight"])] == 0.125
    assert decay_of[id(named["encoder.blocks.0.attn.qkv.weight"])] == config.weight_decay
    for no_decay in ("encoder.pos_embed", "encoder.cls_token", "encoder.blocks.0.attn.qkv.bias", "encoder.norm.weight"):
        assert decay_of[id(named[no_decay])] == 0.0
    assert len(scale_of) == sum(p.requires_grad for p in model.parameters())


def test_frozen_regime_optimises_only_the_head() -> None:
    tuner = FineTuner(ClassificationTask(2), FineTuneConfig(regime="frozen"))
    model = tuner.build_model(tiny_encoder())
    groups = parameter_groups(model, tuner.config)
    trained = {id(p) for g in groups for p in g["params"]}
    assert trained == {id(p) for p in model.head.parameters()}


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    values = [learning_rate(step, 100, 10, 1e-3, 1e-6) for step in range(100)]
    assert values[0] == pytest.approx(1e-4) and values[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(values[9:]))
    assert values[-1] == pytest.approx(1e-6, abs=1e-6)
    assert learning_rate(55, 100, 10, 1e-3, 0.0) == pytest.approx(0.5e-3)


@pytest.mark.parametrize("regime", ["frozen", "full"])
def test_train_epochs_changes_what_the_regime_trains(regime: str) -> None:
    tuner = FineTuner(ClassificationTask(2), FineTuneConfig(regime=regime, batch_size=8))  # type: ignore[arg-type]
    model = tuner.build_model(tiny_encoder())
    before_encoder, before_head = get_weights(model, "encoder"), get_weights(model, "head")
    loader = tuner.loader(bright_dark(16, 0), PRE, train=True)
    state = tuner.init_state(model, total_steps=4)
    metrics = tuner.train_epochs(state, loader, epochs=2)
    assert metrics["steps"] == 4 and state.step == 4 and math.isfinite(metrics["loss"])
    encoder_moved = any(
        not torch.equal(v, get_weights(model, "encoder")[k]) for k, v in before_encoder.items() if v.is_floating_point()
    )
    head_moved = any(not torch.equal(v, get_weights(model, "head")[k]) for k, v in before_head.items())
    assert head_moved
    assert encoder_moved == (regime == "full")


def test_fit_learns_and_restores_the_best_validation_epoch() -> None:
    config = FineTuneConfig(epochs=4, batch_size=8, lr=3e-3, warmup_epochs=0.5)
    tuner = FineTuner(ClassificationTask(2, mode="binary", label_smoothing=0.0), config)
    val = bright_dark(12, 2)
    result = tuner.fit(tiny_encoder(), bright_dark(32, 1), val, PRE)
    aucs = [record.validation["auc"] for record in result.history]
    assert result.selection_metric == "auc" and result.best_epoch == int(np.argmax(aucs))
    assert max(aucs) == 1.0 and result.best_validation["accuracy"] >= 0.9
    again = tuner.evaluate(result.model, tuner.loader(val, PRE, train=False))
    assert again["auc"] == pytest.approx(result.best_validation["auc"])
    assert again["loss"] == pytest.approx(result.best_validation["loss"], rel=1e-5)


def test_fit_refuses_to_select_without_validation() -> None:
    with pytest.raises(ConfigError, match="validation"):
        FineTuner(ClassificationTask(2), FineTuneConfig()).fit(tiny_encoder(), bright_dark(4, 0), [], PRE)


def test_unknown_selection_metric_is_named() -> None:
    tuner = FineTuner(ClassificationTask(2), FineTuneConfig(epochs=1, batch_size=4, select_metric="dice"))
    with pytest.raises(ConfigError, match="'dice' is not a classification metric"):
        tuner.fit(tiny_encoder(), bright_dark(8, 0), bright_dark(4, 1), PRE)


def test_weights_round_trip_and_mismatch_is_named() -> None:
    tuner = FineTuner(ClassificationTask(3), FineTuneConfig())
    source, target = tuner.build_model(tiny_encoder()), tuner.build_model(tiny_encoder())
    set_weights(target, get_weights(source, "all"), "all")
    images = torch.randn(2, 3, 32, 32)
    source.eval(), target.eval()
    assert torch.equal(source(images), target(images))
    assert all(k.startswith(("encoder.", "head.")) for k in get_weights(source, "all"))
    assert "pos_embed" in get_weights(source, "encoder")  # timm keys, as the federation averages them
    with pytest.raises(ConfigError, match="head"):
        set_weights(target, {"nope": torch.zeros(1)}, "head")


def test_rebuilt_state_continues_the_schedule() -> None:
    tuner = FineTuner(ClassificationTask(2), FineTuneConfig(epochs=2, batch_size=8, lr=1e-3, warmup_epochs=0))
    model = tuner.build_model(tiny_encoder())
    loader = tuner.loader(bright_dark(16, 0), PRE, train=True)
    state = tuner.init_state(model, total_steps=4, start_step=2, steps_per_epoch=2)
    metrics = tuner.train_epochs(state, loader, 1)
    assert state.step == 4
    assert metrics["lr"] == pytest.approx(learning_rate(3, 4, 0, 1e-3, tuner.config.min_lr))


def test_unreadable_images_are_skipped_not_fatal(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    samples = bright_dark(8, 0)
    tuner = FineTuner(ClassificationTask(2), FineTuneConfig(batch_size=4))
    model = tuner.build_model(tiny_encoder())
    evaluation = tuner.evaluate(
        model, tuner.loader([*samples, TaskSample(ImageItem(str(broken)), label=1)], PRE, train=False)
    )
    assert evaluation["count"] == 8 and evaluation["skipped"] == 1
    train_loader = tuner.loader([TaskSample(ImageItem(str(broken)), label=1), *samples], PRE, train=True)
    assert tuner.train_epochs(tuner.init_state(model, 2), train_loader, 1)["steps"] == 2
    assert str(broken) in train_loader.dataset.skipped  # type: ignore[attr-defined]


def test_selection_prefers_defined_metrics_then_lower_loss() -> None:
    defined = selection_score({"auc": 0.6, "loss": 9.0}, "auc", higher=True)
    undefined_low_loss = selection_score({"auc": math.nan, "loss": 0.1}, "auc", higher=True)
    undefined_high_loss = selection_score({"auc": math.nan, "loss": 2.0}, "auc", higher=True)
    assert defined > undefined_low_loss > undefined_high_loss
    assert selection_score({"mre": 5.0}, "mre", higher=False) > selection_score({"mre": 7.0}, "mre", higher=False)


def test_validation_with_one_class_still_selects_by_loss() -> None:
    one_class = [s for s in bright_dark(16, 3) if s.label == 1]
    tuner = FineTuner(ClassificationTask(2, label_smoothing=0.0), FineTuneConfig(epochs=3, batch_size=8, lr=3e-3))
    result = tuner.fit(tiny_encoder(), bright_dark(16, 1), one_class, PRE)
    losses = [r.validation["loss"] for r in result.history]
    assert all(math.isnan(r.validation["auc"]) for r in result.history)
    assert result.best_epoch == int(np.argmin(losses))
