"""Weight averaging during fine-tuning: the running average, and that ``fit`` validates, selects and
returns the averaged weights (not the last ones) when ``ema_decay`` is set."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from tests.unit.tasks.helpers import single_torch_thread, tiny_encoder  # noqa: F401  (autouse fixture)
from tests.unit.tasks.test_trainer import PRE, bright_dark
from visionfm_core.errors import ConfigError
from visionfm_core.models.heads import TaskModel
from visionfm_core.tasks.adapters import ClassificationTask
from visionfm_core.tasks.trainer import AVERAGED_SHARE_INVERSE, FineTuneConfig, FineTuner, TrainState
from visionfm_core.tasks.weight_average import WeightAverage


class Weights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.register_buffer("scale", torch.zeros(1))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def test_plain_mean_until_the_window_is_full_then_exponential() -> None:
    module = Weights()
    average = WeightAverage(module, decay=0.75)  # a window of 1 / (1 - 0.75) = 4 updates
    for value in (1.0, 2.0, 3.0, 4.0):
        with torch.no_grad():
            module.w.fill_(value)
            module.scale.fill_(10 * value)
            module.count.fill_(int(value))
        average.update(module)
    # The first four updates are the plain mean (the initial zeros are not part of it).
    assert average.module.w.tolist() == pytest.approx([2.5, 2.5])
    assert float(average.module.scale) == pytest.approx(25.0)  # float buffers are averaged too
    assert int(average.module.count) == 4  # integer buffers are copied
    assert average.current_decay() == 0.75
    with torch.no_grad():
        module.w.fill_(6.5)
    average.update(module)
    assert average.module.w.tolist() == pytest.approx([0.75 * 2.5 + 0.25 * 6.5] * 2)
    assert module.w.tolist() == [6.5, 6.5]  # the source is never changed
    assert not any(p.requires_grad for p in average.module.parameters())


def test_decay_outside_0_1_is_refused() -> None:
    with pytest.raises(ConfigError, match="ema_decay"):
        FineTuneConfig(ema_decay=1.0)
    with pytest.raises(ValueError):
        WeightAverage(Weights(), 0.0)


class Recording(FineTuner):
    """Records, at every validation, the weights validated and the weights being trained."""

    def init_state(self, model: TaskModel, total_steps: int, start_step: int = 0,
                   steps_per_epoch: int | None = None) -> TrainState:
        self.state = super().init_state(model, total_steps, start_step, steps_per_epoch)
        self.validated: list[dict[str, Tensor]] = []
        self.trained: list[dict[str, Tensor]] = []
        return self.state

    def evaluate(self, model: TaskModel, loader: DataLoader[Any], flips: bool = False) -> dict[str, float]:
        self.validated.append({k: v.clone() for k, v in model.state_dict().items()})
        self.trained.append({k: v.clone() for k, v in self.state.model.state_dict().items()})
        return super().evaluate(model, loader, flips)


def same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run(ema_decay: float) -> tuple[Recording, Any]:
    config = FineTuneConfig(epochs=3, batch_size=8, lr=3e-3, ema_decay=ema_decay, seed=0)
    tuner = Recording(ClassificationTask(2), config)
    result = tuner.fit(tiny_encoder(), bright_dark(32, 1), bright_dark(8, 2), PRE)
    return tuner, result


def test_fit_validates_selects_and_returns_the_averaged_weights() -> None:
    tuner, result = run(ema_decay=0.9)  # 12 steps: the window is capped at 12 / 8 steps (decay 1 / 3)
    assert tuner.state.average is not None and len(tuner.validated) == 3
    final = {k: v.cpu() for k, v in result.model.state_dict().items()}
    for validated, trained in zip(tuner.validated, tuner.trained, strict=True):
        assert not same(validated, trained)  # the average, not the weights the optimiser left
    # The returned model (what pipeline.finetune saves) is the averaged model of the selected epoch.
    assert same(final, tuner.validated[result.best_epoch])
    assert not same(final, tuner.trained[result.best_epoch])
    if result.best_epoch == 2:
        assert same(final, tuner.state.average.state_dict())


def test_without_averaging_the_trained_weights_are_validated_and_returned() -> None:
    tuner, result = run(ema_decay=0.0)
    assert tuner.state.average is None
    for validated, trained in zip(tuner.validated, tuner.trained, strict=True):
        assert same(validated, trained)
    final = {k: v.cpu() for k, v in result.model.state_dict().items()}
    assert same(final, tuner.validated[result.best_epoch])


def test_a_short_run_averages_over_its_last_eighth_only() -> None:
    tuner = FineTuner(ClassificationTask(2), FineTuneConfig(ema_decay=0.99))
    model = tuner.build_model(tiny_encoder())
    assert AVERAGED_SHARE_INVERSE == 8
    long_run = tuner.init_state(model, total_steps=1600).average
    assert long_run is not None and long_run.decay == 0.99  # a window of 100 steps fits
    short_run = tuner.init_state(model, total_steps=80).average
    assert short_run is not None and short_run.decay == pytest.approx(0.9)  # a window of 10 steps
    assert tuner.init_state(model, total_steps=8).average is None  # nothing to average
