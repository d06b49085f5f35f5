"""bench_ssl_step's fraction of the matmul peak: per round against the probe that followed the step, and
best step over best matmul. Synthetic (wall, CPU) times, so the statistic itself is checked, not a machine."""

from __future__ import annotations

import pytest
import torch

from bench.bench_ssl_step import PeakProbe, fraction_of_peak

STEP_GFLOP, MATMUL_GFLOP = 100.0, 10.0


def test_each_round_is_its_step_against_the_probe_run_after_it() -> None:
    # Round 1: step 2 s (50 GFLOP/s), probe 4 matmuls in 0.5 s (80 GFLOP/s) -> 62.5%.
    # Round 2: a loaded round, both slower: step 4 s (25), probe 2 matmuls in 0.5 s (40) -> 62.5%.
    # Round 3: step 2.5 s (40), probe 1 matmul in 0.2 s (50) -> 80%.
    steps = [(9.0, 2.0), (9.0, 4.0), (9.0, 2.5)]
    probes = [[(1.0, 0.125)] * 4, [(1.0, 0.25)] * 2, [(1.0, 0.2)]]
    fraction = fraction_of_peak(STEP_GFLOP, steps, MATMUL_GFLOP, probes, best_peak_s=0.2)
    assert fraction.per_round == pytest.approx([0.625, 0.625, 0.8])
    assert fraction.median == pytest.approx(0.625)
    # Best step 2 s (50 GFLOP/s) over the fastest single matmul anywhere, 0.125 s (80 GFLOP/s).
    assert fraction.best == pytest.approx(0.625)
    assert "median 62.5% of 3 rounds (min 62.5%, max 80.0%)" in fraction.describe()


def test_best_uses_the_fastest_matmul_of_the_run_including_the_one_before_the_steps() -> None:
    steps = [(2.0, 2.0)]
    probes = [[(0.2, 0.2)]]
    faster_before = fraction_of_peak(STEP_GFLOP, steps, MATMUL_GFLOP, probes, best_peak_s=0.1)
    assert faster_before.best == pytest.approx(0.5)  # 50 GFLOP/s over 100
    slower_before = fraction_of_peak(STEP_GFLOP, steps, MATMUL_GFLOP, probes, best_peak_s=0.4)
    assert slower_before.best == pytest.approx(1.0)  # 50 over the probe's 50
    wall = fraction_of_peak(STEP_GFLOP, [(4.0, 2.0)], MATMUL_GFLOP, [[(0.2, 0.1)]], best_peak_s=1.0, clock=0)
    assert wall.per_round == pytest.approx([0.5])  # the wall clock on both sides: 25 over 50


def test_the_probe_runs_for_as_long_as_asked_and_times_every_matmul() -> None:
    probe = PeakProbe(32, torch.float32, torch.device("cpu"))
    assert probe.gflop == pytest.approx(2 * 32**3 / 1e9)
    assert len(probe.run(0.0)) == 1  # at least one matmul
    calls = probe.run(0.02)
    assert sum(cpu for _, cpu in calls) >= 0.02
    assert all(wall >= 0 and cpu >= 0 for wall, cpu in calls)
