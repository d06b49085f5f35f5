"""Per-round site sampling: sizes, seeding, independence of rounds and phases, and the deadline."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.federation.sampling import StragglerLedger, exchange_deadline, sample_sites, sample_size
from visionfm_core.errors import ConfigError
from visionfm_core.run_config import RunConfig


def test_the_sample_is_the_fraction_rounded_up_and_at_least_min_sites() -> None:
    assert sample_size(1000, 0.05, 1) == 50
    assert sample_size(1000, 0.0501, 1) == 51
    assert sample_size(10, 0.05, 3) == 3
    assert sample_size(2, 0.5, 3) == 2  # never more than are connected
    assert sample_size(5, 0.6, 1) == 3 and sample_size(3, 0.67, 1) == 3  # 0.6 * 5 = 3.0000000000000004
    nodes = list(range(100, 1100))
    picked = sample_sites(nodes, 0.05, 1, seed=7, server_round=1)
    assert len(picked) == 50 == len(set(picked)) and set(picked) <= set(nodes) and picked == sorted(picked)


def test_the_sample_repeats_for_the_same_seed_and_round_whatever_the_order_of_the_nodes() -> None:
    nodes = [9, 3, 7, 1, 5, 11, 2, 8]
    first = sample_sites(nodes, 0.5, 1, seed=3, server_round=2)
    assert sample_sites(list(reversed(nodes)), 0.5, 1, seed=3, server_round=2) == first


def test_rounds_seeds_and_phases_draw_different_samples() -> None:
    nodes = list(range(200))
    base = sample_sites(nodes, 0.1, 1, seed=0, server_round=1)
    assert sample_sites(nodes, 0.1, 1, seed=0, server_round=2) != base
    assert sample_sites(nodes, 0.1, 1, seed=1, server_round=1) != base
    assert sample_sites(nodes, 0.1, 1, seed=0, server_round=1, phase="evaluate") != base


def test_every_site_is_asked_over_many_rounds() -> None:
    nodes = list(range(40))
    asked = {n for r in range(1, 60) for n in sample_sites(nodes, 0.1, 1, seed=0, server_round=r)}
    assert asked == set(nodes)


def test_fraction_one_asks_everyone() -> None:
    assert sample_sites([4, 2, 9], 1.0, 1, seed=0, server_round=5) == [2, 4, 9]


def test_the_deadline_is_the_shorter_of_deadline_and_timeout() -> None:
    assert exchange_deadline(100.0, 1800.0, 0.0) == 1900.0
    assert exchange_deadline(100.0, 1800.0, 30.0) == 130.0
    assert exchange_deadline(100.0, 20.0, 30.0) == 120.0


def test_late_replies_are_counted_once() -> None:
    ledger = StragglerLedger()
    ledger.give_up({"a", "b"})
    assert ledger.forget(["a", "x"]) == 1 and ledger.forget(["a"]) == 0
    assert ledger.outstanding == {"b"} and ledger.dropped_total == 1


@pytest.mark.parametrize(("key", "value"), [("fraction-train", 0.0), ("fraction-evaluate", 1.5),
                                            ("round-deadline", -1)])
def test_bad_sampling_settings_name_the_key(key: str, value: float) -> None:
    with pytest.raises(ConfigError) as raised:
        RunConfig.from_flat({key: value})
    assert key in str(raised.value)


def test_a_sites_memory_numbers_reach_the_metrics_only_when_plausible(tmp_path: Path) -> None:
    from server.federation.rounds import Federation

    federation = Federation(None, RunConfig(out_dir=str(tmp_path)), {})  # type: ignore[arg-type]
    federation._note_memory(1, "site-1", {"memory-rss-mb": 512.0, "memory-peak-rss-mb": 640})
    federation._note_memory(1, "site-2", {"memory-rss-mb": float("nan"), "memory-peak-rss-mb": -1.0})
    federation._note_memory(1, "site-3", {"memory-rss-mb": float("inf"), "memory-peak-rss-mb": True})
    rows = [r for r in federation.metrics.rows if r["phase"] == "memory"]
    assert rows == [{"round": 1, "site": "site-1", "modality": "all", "phase": "memory", "rss_mb": 512.0,
                     "peak_rss_mb": 640.0}]
