"""Experiment tracking of a run: its config, per-round metrics and final encoders, in MLflow or TensorBoard.

`tracking = "mlflow"` logs to a local MLflow store in the run folder (`OUT/mlruns/mlflow.db`, artifacts in
`OUT/mlruns/artifacts`; MLflow 3 keeps its plain-file store in maintenance mode, so the local store is
SQLite: `mlflow ui --backend-store-uri sqlite:///OUT/mlruns/mlflow.db` shows it). `tracking = "tensorboard"`
writes event files to `OUT/tensorboard` (`tensorboard --logdir OUT/tensorboard`). Nothing leaves the
machine unless `tracking-uri` names a server; MLflow's usage telemetry is switched off.

Metrics are the rows of `metrics.json` (numbers and site labels the coordinator already records), logged
with the round as step under `<phase>/<site>/<modality>/<metric>` ("server" and "all" left out).
A failure to log is reported and never stops a federation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from visionfm_core.errors import ConfigError
from visionfm_core.run_config import RunConfig

logger = logging.getLogger(__name__)
KEY_COLUMNS = ("round", "site", "modality", "phase")
STATE_FILE = "tracking.json"  # the MLflow run a resumed run continues
EXPERIMENT = "visionfm-fed"
MAX_PARAM_CHARS = 500


class Tracker(Protocol):
    """Where a run's config, metrics and encoders are logged."""

    def log_config(self, flat: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: list[tuple[str, float, int]]) -> None: ...

    def log_encoders(self, folder: Path) -> None: ...

    def close(self, succeeded: bool) -> None: ...


def metric_name(row: Mapping[str, Any], name: str) -> str:
    """`<phase>/<site>/<modality>/<metric>`, without the placeholder site "server" and modality "all"."""
    parts = [str(row["phase"]), str(row["site"]), str(row["modality"]), name]
    return "/".join(p for i, p in enumerate(parts) if not (i == 1 and p == "server") and not (i == 2 and p == "all"))


def row_metrics(rows: Iterable[Mapping[str, Any]]) -> list[tuple[str, float, int]]:
    """(name, value, round) of every finite number in metrics rows."""
    found = []
    for row in rows:
        for key, value in row.items():
            if key in KEY_COLUMNS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if value == value and abs(value) != float("inf"):  # NaN/Inf are not logged
                found.append((metric_name(row, key), float(value), int(row["round"])))
    return found


class MlflowTracker:
    """An MLflow run, through MLflow's client (no global fluent state: the ServerApp may run threads)."""

    def __init__(self, uri: str, out_dir: Path, run_name: str, resume: bool) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise ConfigError("tracking", "mlflow is not installed: pip install 'visionfm-fed[mlflow]'") from exc
        local = not uri
        if local:
            store = (out_dir / "mlruns").resolve()
            store.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{store / 'mlflow.db'}"
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            artifacts = (out_dir / "mlruns" / "artifacts").resolve().as_uri() if local else None
            experiment_id = self.client.create_experiment(EXPERIMENT, artifact_location=artifacts)
        state = out_dir / STATE_FILE
        previous = json.loads(state.read_text()) if resume and state.is_file() else {}
        if previous.get("backend") == "mlflow" and previous.get("uri") == uri:
            self.run_id = str(previous["run_id"])
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            state.write_text(json.dumps({"backend": "mlflow", "uri": uri, "run_id": self.run_id}, indent=1))
        logger.info("tracking in MLflow run %s at %s", self.run_id, uri)

    def log_config(self, flat: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        params = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in sorted(flat.items())
                  if k not in existing and k != "resume"]  # a param is written once; resume flips
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.client.log_dict(self.run_id, dict(flat), "config.json")

    def log_metrics(self, metrics: list[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(name, value, now, step) for name, value, step in metrics]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start:start + 1000])

    def log_encoders(self, folder: Path) -> None:
        self.client.log_artifacts(self.run_id, str(folder), folder.name)

    def close(self, succeeded: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if succeeded else "FAILED")


class TensorBoardTracker:
    """TensorBoard event files (torch's SummaryWriter; the `tensorboard` package reads and shows them)."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError(
                "tracking", "tensorboard is not installed: pip install 'visionfm-fed[tensorboard]'"
            ) from exc
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=str(log_dir))
        logger.info("tracking in TensorBoard event files under %s", log_dir)

    def log_config(self, flat: Mapping[str, Any]) -> None:
        table = ["| key | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in sorted(flat.items())]
        self.writer.add_text("config", "\n".join(table))
        self.writer.flush()

    def log_metrics(self, metrics: list[tuple[str, float, int]]) -> None:
        for name, value, step in metrics:
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def log_encoders(self, folder: Path) -> None:
        """TensorBoard keeps no files: the encoders are copied beside the event files and listed."""
        target = self.log_dir / folder.name
        target.mkdir(parents=True, exist_ok=True)
        lines = []
        for path in sorted(folder.glob("*.safetensors")):
            shutil.copy2(path, target / path.name)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            lines.append(f"- `{folder.name}/{path.name}`: {path.stat().st_size:,} bytes, sha256 `{digest}`")
        self.writer.add_text(folder.name, "\n".join(lines) or "no encoder files")
        self.writer.flush()

    def close(self, succeeded: bool) -> None:
        self.writer.close()


def open_tracker(cfg: RunConfig) -> Tracker | None:
    """The run's tracker (None without `tracking`); ConfigError when its package is missing."""
    out = Path(cfg.out_dir)
    if cfg.tracking == "mlflow":
        return MlflowTracker(cfg.tracking_uri, out, out.resolve().name, cfg.resume)
    if cfg.tracking == "tensorboard":
        return TensorBoardTracker(Path(cfg.tracking_uri) if cfg.tracking_uri else out / "tensorboard")
    return None


class RunTracking:
    """Follows a run's MetricsLog: after each save, logs the numbers not logged yet. Logging failures are
    reported, never raised: a tracking server that is down must not stop a months-long federation."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.logged: set[tuple[str, int, float]] = set()

    def _safely(self, what: str, action: Any, *args: Any) -> None:
        try:
            action(*args)
        except Exception as exc:
            logger.warning("tracking: could not log %s (%s: %s)", what, type(exc).__name__, exc)

    def start(self, flat: Mapping[str, Any], already_logged: Iterable[Mapping[str, Any]] = ()) -> None:
        """Log the config; rows of `already_logged` (a resumed run's earlier rounds) are not logged again."""
        self.logged.update((n, s, v) for n, v, s in row_metrics(already_logged))
        self._safely("the config", self.tracker.log_config, flat)

    def rows_saved(self, rows: list[dict[str, Any]]) -> None:
        new = [(n, v, s) for n, v, s in row_metrics(rows) if (n, s, v) not in self.logged]
        if new:
            self._safely("metrics", self.tracker.log_metrics, new)
            self.logged.update((n, s, v) for n, v, s in new)

    def finish_artifacts(self, encoders: Path) -> None:
        """Log a folder of final encoders (`encoders/`, `finetuned/`)."""
        self._safely("the encoders", self.tracker.log_encoders, encoders)

    def close(self, succeeded: bool) -> None:
        self._safely("the end of the run", self.tracker.close, succeeded)
