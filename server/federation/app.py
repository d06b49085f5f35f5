"""The ServerApp: federated DINO/iBOT pretraining of one encoder per modality.

`flwr run .` uses `app` with the run config from pyproject.toml (or --run-config); `visionfm simulate`
builds the same app around a resolved scenario config with `make_server_app`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation.rounds import Federation, FederationResult
from server.federation.tracking import RunTracking, open_tracker
from visionfm_core.pretraining import initial_global_arrays
from visionfm_core.run_config import RunConfig

logger = logging.getLogger(__name__)


def run_federation(grid: Grid, cfg: RunConfig) -> FederationResult:
    """Build the initial global model and run every round on `grid`: pretraining (unless `init-encoders`
    gives the encoders), then `finetune-rounds` fine-tuning rounds when configured. With `tracking`, the
    config, every round's metrics and the final encoders are logged as they come (server/federation/tracking.py)."""
    tracker = open_tracker(cfg)  # a missing tracking package fails the run now, not after its rounds
    if tracker is None:
        return _run_phases(grid, cfg, None)
    tracking = RunTracking(tracker)
    metrics_file = Path(cfg.out_dir) / "metrics.json"
    earlier = json.loads(metrics_file.read_text()) if cfg.resume and metrics_file.is_file() else []
    tracking.start(cfg.to_flat(), earlier)
    succeeded = False
    try:
        result = _run_phases(grid, cfg, tracking)
        succeeded = True
        return result
    finally:
        for folder in ("encoders", "finetuned"):
            if (Path(cfg.out_dir) / folder).is_dir() and succeeded:
                tracking.finish_artifacts(Path(cfg.out_dir) / folder)
        tracking.close(succeeded)


def _run_phases(grid: Grid, cfg: RunConfig, tracking: RunTracking | None) -> FederationResult:
    if cfg.finetune_rounds > 0:
        from server.federation.finetune_phase import resolve_finetune_task

        resolve_finetune_task(cfg)  # a task that cannot be built fails now, not after pretraining
    evaluator = None
    site_names: list[str] = []
    if cfg.scenario:
        from server.federation.central_eval import scenario_test_evaluator
        from strategies.protocol.scenario import load_scenario

        site_names = [s.name for s in load_scenario(cfg.scenario).sites]
        if cfg.server_eval == "scenario":
            evaluator = scenario_test_evaluator(cfg)
    if cfg.init_encoders:
        from server.federation.finetune_phase import load_init_encoders

        pretrained, rounds_done = load_init_encoders(cfg), 0
    else:
        initial = {k: v.numpy() for k, v in initial_global_arrays(cfg).items()}
        federation = Federation(grid, cfg, initial, evaluator, site_names)
        if tracking is not None:
            federation.metrics.on_save.append(tracking.rows_saved)
        result = federation.run()
        if cfg.finetune_rounds == 0:
            return result
        pretrained, rounds_done = result.arrays, cfg.num_rounds
    return _run_finetune_phase(grid, cfg, pretrained, site_names, rounds_done, tracking)


def _run_finetune_phase(grid: Grid, cfg: RunConfig, pretrained: dict[str, Any], site_names: list[str],
                        rounds_done: int, tracking: RunTracking | None) -> FederationResult:
    from server.federation.finetune_phase import FineTunePhase, resolve_finetune_task, task_test_evaluator

    evaluator = None
    if cfg.scenario and cfg.server_eval == "scenario":
        evaluator = task_test_evaluator(resolve_finetune_task(cfg))
    phase = FineTunePhase(grid, cfg, pretrained, evaluator, site_names, round_offset=rounds_done)
    if tracking is not None:
        phase.metrics.on_save.append(tracking.rows_saved)
    if cfg.central_dp_noise > 0 and rounds_done:
        # Site-level DP composes over both phases: fine-tuning's releases add to pretraining's.
        phase.central_accountant.step(rounds_done)
    return phase.run()


def resolve_run_config(flat: Mapping[str, Any]) -> RunConfig:
    """Typed run config; with a scenario, its [run] table fills what `flat` leaves unset."""
    scenario_ref = str(flat.get("scenario", ""))
    if not scenario_ref:
        return RunConfig.from_flat(flat)
    from strategies.protocol.scenario import load_scenario, resolve_config

    return resolve_config(load_scenario(scenario_ref), scenario_ref, flat)


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is the app's config updated with `overrides` (flat, kebab-case)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        flat = dict(context.run_config)
        flat.update(overrides or {})
        run_federation(grid, resolve_run_config(flat))

    return server_app


app = make_server_app()
