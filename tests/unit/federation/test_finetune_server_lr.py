"""`finetune-server-lr`: the fine-tuning phase moves the global model that many times the sites' averaged
update each round (1 = plain FedAvg), through the real round loop with every reply still checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.federation.finetune_phase import FineTunePhase
from tests.unit.federation.site_grid import SITE_NAMES, HonestSite, SiteGrid
from visionfm_core.errors import ConfigError
from visionfm_core.pretraining import initial_global_arrays
from visionfm_core.run_config import RunConfig

STEPS = {1: 0.01, 2: 0.02, 3: 0.03}
EXAMPLES = {1: 10, 2: 20, 3: 30}
FEDAVG = sum(STEPS[n] * EXAMPLES[n] for n in STEPS) / sum(EXAMPLES.values())  # each round's averaged step


def _run(tmp_path: Path, server_lr: float, rounds: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    cfg = RunConfig(out_dir=str(tmp_path / f"run-{server_lr}"), num_rounds=1, finetune_rounds=rounds,
                    finetune_classes="fundus=2", finetune_server_lr=server_lr, min_sites=2, round_timeout=5,
                    rejoin_grace=0, arch="nano", image_size=32, patch_size=8)
    pretrained = {k: v.numpy() for k, v in initial_global_arrays(cfg).items()}
    grid = SiteGrid({node: HonestSite(STEPS[node], EXAMPLES[node]) for node in STEPS})
    phase = FineTunePhase(grid, cfg, pretrained, site_names=SITE_NAMES, poll_interval=0.0)  # type: ignore[arg-type]
    start = dict(phase.arrays)
    phase.run()
    return start, phase.arrays


@pytest.mark.parametrize("server_lr", [1.0, 2.5, 0.5])
def test_the_global_model_moves_server_lr_times_the_averaged_update(tmp_path: Path, server_lr: float) -> None:
    start, final = _run(tmp_path, server_lr, rounds=2)
    for key, value in final.items():  # encoder and shared head alike, every round
        np.testing.assert_allclose(value, start[key] + np.float32(2 * server_lr * FEDAVG), rtol=1e-4, atol=1e-5,
                                   err_msg=key)


@pytest.mark.parametrize("value", [0.0, -1.0, 11.0, float("nan")])
def test_a_bad_server_lr_is_refused_by_name(value: float) -> None:
    with pytest.raises(ConfigError) as raised:
        RunConfig.from_flat({"finetune-rounds": 1, "finetune-server-lr": value})
    assert raised.value.key == "finetune-server-lr"
