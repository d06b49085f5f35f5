"""Schedules: endpoints, warm-up and monotonicity of lr, weight decay, teacher momentum, temperatures."""

from __future__ import annotations

import itertools
import math

import pytest

from visionfm_core.ssl.config import SSLConfig
from visionfm_core.ssl.schedules import cosine_schedule, schedule_at, warmup_then_constant

TOTAL = 100


def _series(cfg: SSLConfig, name: str) -> list[float]:
    return [getattr(schedule_at(cfg, s, TOTAL), name) for s in range(TOTAL)]


def test_lr_warms_up_linearly_then_decays_by_cosine_to_min_lr() -> None:
    cfg = SSLConfig(lr=1e-3, min_lr=1e-5, warmup_fraction=0.1)
    lr = _series(cfg, "lr")
    assert lr[0] == pytest.approx(1e-3 / 10)  # first step already learns
    assert lr[9] == pytest.approx(1e-3)
    assert all(b > a for a, b in itertools.pairwise(lr[:10]))
    assert lr[10] == pytest.approx(1e-3)
    assert all(b <= a for a, b in itertools.pairwise(lr[10:]))
    assert lr[-1] == pytest.approx(1e-5)
    # Half way through the cosine part the value is the midpoint.
    mid = 10 + (TOTAL - 1 - 10) / 2
    assert cosine_schedule(int(mid), TOTAL, 1e-3, 1e-5, 10) == pytest.approx(
        1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * (int(mid) - 10) / (TOTAL - 11))))


def test_weight_decay_and_teacher_momentum_rise_by_cosine_to_their_end_values() -> None:
    cfg = SSLConfig(weight_decay=0.04, weight_decay_end=0.4, teacher_momentum=0.996)
    wd = _series(cfg, "weight_decay")
    momentum = _series(cfg, "teacher_momentum")
    assert wd[0] == pytest.approx(0.04) and wd[-1] == pytest.approx(0.4)
    assert momentum[0] == pytest.approx(0.996) and momentum[-1] == pytest.approx(1.0)
    assert all(b >= a for a, b in itertools.pairwise(wd))
    assert all(b >= a for a, b in itertools.pairwise(momentum))


def test_teacher_temperatures_warm_up_linearly_then_hold() -> None:
    cfg = SSLConfig(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_patch_teacher_temp=0.04,
                    patch_teacher_temp=0.07, warmup_teacher_temp_fraction=0.3)
    temps = _series(cfg, "teacher_temp")
    assert temps[0] == pytest.approx(0.04)
    assert temps[15] == pytest.approx(0.04 + 0.03 * 15 / 30)
    assert all(t == pytest.approx(0.07) for t in temps[30:])
    assert _series(cfg, "patch_teacher_temp") == pytest.approx(temps)
    assert warmup_then_constant(5, 10, 1.0, 2.0, 0) == 2.0


def test_last_layer_is_frozen_for_its_fraction_only() -> None:
    frozen = _series(SSLConfig(freeze_last_layer_fraction=0.05), "freeze_last_layer")
    assert frozen[:5] == [True] * 5
    assert not any(frozen[5:])


def test_steps_outside_the_run_hold_the_end_values() -> None:
    cfg = SSLConfig()
    assert schedule_at(cfg, TOTAL + 50, TOTAL) == schedule_at(cfg, TOTAL - 1, TOTAL)
    assert schedule_at(cfg, -3, TOTAL) == schedule_at(cfg, 0, TOTAL)
    # A one-step run trains at the base learning rate rather than at min_lr.
    assert schedule_at(SSLConfig(warmup_fraction=0.0), 0, 1).lr == pytest.approx(cfg.lr)
