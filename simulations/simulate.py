"""`visionfm simulate`: a whole federation on one machine with Flower's simulation engine (Ray), or the
centralized / local-only baselines on the same data, scored on the same held-out test split."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.federation.report import MetricsLog
from strategies.protocol.scenario import Scenario, load_scenario, resolve_config, scenario_to_dict
from visionfm_core.errors import ConfigError
from visionfm_core.run_config import RunConfig

logger = logging.getLogger(__name__)

MODES = ("federated", "centralized", "local")


@dataclass
class SimulationOutcome:
    """Where a simulation wrote its results, and its metrics."""

    mode: str
    out_dir: Path
    metrics: MetricsLog
    seconds: float
    # Per modality: the probe on colour statistics alone (no encoder), on the same test split.
    reference: dict[str, dict[str, float]] = field(default_factory=dict)


def quiet_framework_logs() -> None:
    """Keep Flower's and Ray's chatter (deprecation notes, actor start-up) off the console.

    Flower resets its logger's level while a simulation starts, so the quieting is done on the handlers:
    Flower's own console handler, and a filter on ours that lets only errors from Flower through."""
    import flwr.common.logger  # noqa: F401 - creates Flower's logger and console handler

    for handler in logging.getLogger("flwr").handlers:
        handler.setLevel(logging.ERROR)
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: not record.name.startswith("flwr") or record.levelno >= logging.ERROR)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def _ray_tmpdir(out_dir: Path) -> tuple[str, bool]:
    """Ray's session folder, and whether it is a scratch folder in /tmp to delete after the run. Ray's
    socket paths must stay under ~107 bytes: the folder is inside the run folder when that is short."""
    candidate = out_dir.resolve() / "ray"
    if len(str(candidate)) <= 40:
        candidate.mkdir(parents=True, exist_ok=True)
        return str(candidate), False
    return tempfile.mkdtemp(prefix="vfm-ray-"), True


def backend_config(scenario: Scenario, ray_address: str | None = None, ray_dir: str = "") -> dict[str, Any]:
    """Flower's Ray backend settings: each site reserves the scenario's `[resources]`; Ray is started on this
    machine with all its CPUs, or, given `ray_address` (HOST:PORT of a running cluster's head), joined."""
    resources = scenario.resources
    client_resources = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus}
    if ray_address:
        # The cluster owns its CPUs, GPUs and temp dirs: passing them when joining is an error in Ray.
        return {"client_resources": client_resources,
                "init_args": {"address": ray_address, "include_dashboard": False, "log_to_driver": True}}
    return {"client_resources": client_resources,
            "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False, "log_to_driver": True,
                          "_temp_dir": ray_dir}}


def check_ray_address(address: str) -> str:
    """HOST:PORT of a Ray head (GCS), or `auto`; anything else is an error naming --ray-address."""
    host, sep, port = address.rpartition(":")
    if address != "auto" and (not sep or not host or not port.isdigit() or not 0 < int(port) < 65536):
        raise ConfigError("ray-address", f"expected HOST:PORT of a running Ray head (or 'auto'), got {address!r}")
    return address


def run_federated(scenario: Scenario, cfg: RunConfig, ray_address: str | None = None) -> MetricsLog:
    """Run the ServerApp and one ClientApp per simulated site on Flower's Ray-backed simulation engine,
    on a Ray started here, or on the running cluster at `ray_address`."""
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.federation.app import make_server_app

    out = Path(cfg.out_dir)
    os.environ.setdefault("FLWR_HOME", str((out / "flwr-home").resolve()))
    given = os.environ.get("RAY_TMPDIR")
    ray_dir, scratch = (given or "", False) if (given or ray_address) else _ray_tmpdir(out)
    if not ray_address:
        os.environ["RAY_TMPDIR"] = ray_dir
    config = backend_config(scenario, check_ray_address(ray_address) if ray_address else None, ray_dir)
    try:
        run_simulation(server_app=make_server_app(cfg.to_flat()), client_app=client_app,
                       num_supernodes=len(scenario.sites), backend_config=config)
    finally:
        if not given and not ray_address:
            os.environ.pop("RAY_TMPDIR", None)
        if scratch:  # Ray has shut down: its session logs in /tmp would otherwise pile up run after run
            shutil.rmtree(ray_dir, ignore_errors=True)
    return MetricsLog(out)


def simulate(
    scenario_ref: str = "default", mode: str = "federated", out_dir: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None, scenario_overrides: Mapping[str, Any] | None = None,
    ray_address: str | None = None,
) -> SimulationOutcome:
    """Resolve the scenario and config, run the chosen mode, return where the results are; a federated
    run joins the Ray cluster at `ray_address` when one is given."""
    if mode not in MODES:
        raise ConfigError("mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    scenario = load_scenario(scenario_ref, scenario_overrides)
    out = Path(out_dir or f"runs/{scenario.name}-{mode}")
    out.mkdir(parents=True, exist_ok=True)
    # Sites and the server re-read the scenario by reference, so they get the resolved one (with the
    # command line's --sites/--partition/--alpha), not the bundled file it started from.
    resolved = out.resolve() / "scenario.json"
    resolved.write_text(json.dumps(scenario_to_dict(scenario), indent=2))
    cfg = resolve_config(scenario, str(resolved), {**(overrides or {}), "out-dir": str(out)})
    if cfg.dp:
        from simulations.arm_privacy import require_site_budgets

        require_site_budgets(scenario)  # before Ray starts: a site without a budget could never train
    if not cfg.resume:
        # Simulated sites' ledgers start empty with each fresh simulation; --resume goes on spending.
        shutil.rmtree(out / "sites", ignore_errors=True)
    started = time.perf_counter()
    if mode == "federated":
        metrics = run_federated(scenario, cfg, ray_address)
    else:
        from server.federation.central_eval import scenario_test_evaluator
        from simulations.baselines import run_centralized, run_local

        runner = run_centralized if mode == "centralized" else run_local
        metrics = runner(scenario, cfg, scenario_test_evaluator(cfg))
    seconds = time.perf_counter() - started
    reference = write_reference(out, cfg)
    if "fundus" in cfg.modality_list:
        from simulations.label_efficiency import append_label_efficiency_section

        append_label_efficiency_section(out)  # where the few-labels curve is (and it, when the bench put it here)
    return SimulationOutcome(mode, out, metrics, seconds, reference)


REFERENCE_TITLE = "## Reference: colour statistics, no encoder"


def write_reference(out: Path, cfg: RunConfig) -> dict[str, dict[str, float]]:
    """`reference.json` and a section of `report.md`: the same k-NN and linear probe on each image's
    per-channel colour mean and standard deviation, fitted on the labelled pool, scored on the test split."""
    from server.federation.central_eval import scenario_colour_reference
    from simulations.compare import SCORES

    reference = scenario_colour_reference(cfg)
    (out / "reference.json").write_text(json.dumps(reference, indent=1))
    report = out / "report.md"
    if report.is_file() and reference and REFERENCE_TITLE not in report.read_text():
        lines = ["", REFERENCE_TITLE, "",
                 "The frozen-encoder evaluation's k-NN and linear probe on 6 numbers per image (each channel's "
                 "mean and standard deviation), same pool and held-out test split as `global-test`. An "
                 "encoder has learned something beyond colour only where it scores above this.", "",
                 "| modality | k-NN acc | k-NN AUC | linear acc | linear AUC |", "|---|---|---|---|---|"]
        for modality, scores in reference.items():
            cells = [f"{scores[k]:.3f}" for k in SCORES]
            lines.append(f"| {modality} | " + " | ".join(cells) + " |")
        with report.open("a") as handle:
            handle.write("\n".join(lines) + "\n")
    return reference
