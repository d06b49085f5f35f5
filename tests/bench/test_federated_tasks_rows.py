"""bench_federated_tasks reads each arm's held-out score and the decision threshold it was scored at from the
run's metrics rows: the last held-out round's, never a site's validation-best threshold. Synthetic rows in the
shape the federation and the baseline arms write (server/federation/finetune_phase, baseline_finetune)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))  # the bench imports its helper module `_bench` as a script does

from bench.bench_federated_tasks import held_out_series, held_out_thresholds  # noqa: E402


def _row(round_: int, site: str, **values: Any) -> dict[str, Any]:
    return {"round": round_, "site": site, "modality": "fundus", "phase": "finetune-evaluate", **values}


def test_each_arm_keeps_the_threshold_of_its_last_held_out_score() -> None:
    rows = [
        # Written out of order: the last round by number counts, not the last row.
        _row(8, "global-test", dice=0.77, threshold=0.31),
        _row(4, "global-test", dice=0.70, threshold=0.45),
        # A site's validation row carries its own best threshold: not the held-out one.
        _row(8, "hospital-a", dice=0.75, best_threshold=0.23),
        _row(8, "centralized:global-test", dice=0.766, threshold=0.30),
        _row(8, "hospital-a:global-test", dice=0.7637, threshold=0.23),
        _row(8, "hospital-b:global-test", dice=0.76, threshold=0.27),
        {"round": 8, "site": "hospital-a", "modality": "fundus", "phase": "finetune", "steps": 60.0},
    ]
    assert held_out_thresholds(rows) == {"federated": 0.31, "centralized": 0.30, "hospital-a": 0.23,
                                         "hospital-b": 0.27}
    # The scores the thresholds belong to, per arm and in round order.
    assert held_out_series(rows, "dice") == {"federated": [0.70, 0.77], "centralized": [0.766],
                                             "hospital-a": [0.7637], "hospital-b": [0.76]}


def test_tasks_without_a_threshold_record_none() -> None:
    rows = [_row(3, "global-test", mre=28.8), _row(3, "centralized:global-test", mre=18.1)]
    assert held_out_thresholds(rows) == {}
    assert held_out_series(rows, "mre") == {"federated": [28.8], "centralized": [18.1]}
