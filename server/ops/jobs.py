"""Job files: what `visionfm-server run JOB.toml` federates, as a Flower run-config override.

```toml
[job]
name = "fundus-pretrain"      # the run folder (runs/<name> in the coordinator's state folder)
app = "path/to/project"       # optional: a Flower app project, relative to this file (default: the
                              # deployment app, see server/ops/deploy_app.py: config only, installed code)
phases = ["pretrain"]         # or ["pretrain", "fine-tune"] (then set finetune-rounds under [run-config])
modalities = ["fundus"]
num-rounds = 50               # ("rounds", its old name, is still read, with a deprecation note)
strategy = "fedavg"
min-sites = 2                 # a round goes on with this many replies; fewer fails the round
round-timeout = 1800          # seconds a round waits for the slowest site
rejoin-grace = 60             # seconds a round waits for a site of the last round to reconnect
fraction-train = 1.0          # share of the connected sites each round trains (seeded sample, >= min-sites)
round-deadline = 0            # seconds a round waits for them (0: round-timeout); later replies are dropped

[privacy]                     # passed to the app as privacy.<key> (e.g. noise-multiplier, target-epsilon)

[run-config]                  # any other run-config key the app declares (local-steps, arch, ...)
```
Every key must be one the app declares in its `[tool.flwr.app.config]`: Flower rejects unknown
override keys when the run starts, so the job is checked here first and the error names the key.
"""

from __future__ import annotations

import json
import logging
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visionfm_core.errors import ConfigError
from visionfm_core.toml_files import read_toml

JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KNOWN_PHASES = ("pretrain", "fine-tune")
# Job field -> the app's run-config key (one name for both: a job field is a run-config key).
FIELD_KEYS = {
    "num-rounds": "num-rounds",
    "strategy": "strategy",
    "min-sites": "min-sites",
    "round-timeout": "round-timeout",
    "rejoin-grace": "rejoin-grace",
    "fraction-train": "fraction-train",
    "fraction-evaluate": "fraction-evaluate",
    "round-deadline": "round-deadline",
}
# Old job field names, still read: old name -> the one name the job, the run config and scenarios use.
DEPRECATED_FIELDS = {"rounds": "num-rounds"}
Scalar = str | int | float | bool
logger = logging.getLogger(__name__)


@dataclass
class Job:
    """A parsed job file."""

    name: str
    app: Path | None  # None: the generated deployment app
    phases: list[str]
    overrides: dict[str, Scalar] = field(default_factory=dict)
    source: str = "<job>"


def _scalar(key: str, value: Any) -> Scalar:
    if isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    raise ConfigError(key, f"must be a string, number, boolean or list of strings, got {type(value).__name__}")


def parse_job(data: dict[str, Any], base_dir: Path, source: str = "<job>") -> Job:
    """Validate a parsed job table; every error names the key at fault."""
    unknown = set(data) - {"job", "privacy", "run-config"}
    if unknown:
        raise ConfigError(sorted(unknown)[0], f"unknown table in {source}")
    job = data.get("job")
    if not isinstance(job, dict):
        raise ConfigError("job", f"missing [job] table in {source}")
    name = job.get("name")
    if not isinstance(name, str) or not JOB_NAME.match(name):
        raise ConfigError("job.name", "required: letters, digits, dots, dashes and underscores (max 64)")
    app_value = job.get("app")
    app = None if app_value is None else (base_dir / str(app_value)).resolve()
    phases = job.get("phases", ["pretrain"])
    if not isinstance(phases, list) or not phases or not all(p in KNOWN_PHASES for p in phases):
        raise ConfigError("job.phases", f"a non-empty list of {', '.join(KNOWN_PHASES)}, got {phases!r}")
    overrides: dict[str, Scalar] = {}
    job = dict(job)
    for old, new in DEPRECATED_FIELDS.items():
        if old in job:
            if new in job:
                raise ConfigError(f"job.{old}", f"set only job.{new} ({old} is its deprecated name)")
            logger.warning("%s: job.%s is deprecated, use job.%s (the run-config key)", source, old, new)
            job[new] = job.pop(old)
    extra = set(job) - {"name", "app", "phases", "modalities", *FIELD_KEYS}
    if extra:
        raise ConfigError(f"job.{sorted(extra)[0]}", "unknown key (put app settings under [run-config])")
    if "modalities" in job:
        modalities = job["modalities"]
        if not isinstance(modalities, list) or not modalities or not all(isinstance(m, str) for m in modalities):
            raise ConfigError("job.modalities", "a non-empty list of modality names")
        from visionfm_core.modalities import canonical_modality

        overrides["modalities"] = ",".join(canonical_modality(m) for m in modalities)
    for job_key, config_key in FIELD_KEYS.items():
        if job_key in job:
            overrides[config_key] = _scalar(f"job.{job_key}", job[job_key])
    for table in ("privacy", "run-config"):
        values = data.get(table, {})
        if not isinstance(values, dict):
            raise ConfigError(table, "must be a table")
        prefix = "privacy." if table == "privacy" else ""
        for key, value in _flatten(values).items():
            overrides[prefix + key] = _scalar(f"{table}.{key}", value)
    _check_phases(phases, overrides)
    return Job(name=name, app=app, phases=list(phases), overrides=overrides, source=source)


def _check_phases(phases: list[str], overrides: dict[str, Scalar]) -> None:
    """The app always pretrains; its fine-tuning phase runs when `finetune-rounds` > 0."""
    if "pretrain" not in phases:
        raise ConfigError("job.phases", "the app always pretrains first: include 'pretrain'")
    finetune_rounds = overrides.get("finetune-rounds", 0)
    wants = "fine-tune" in phases
    if wants and not (isinstance(finetune_rounds, int) and finetune_rounds > 0):
        raise ConfigError("job.phases", "'fine-tune' needs finetune-rounds > 0 under [run-config]")
    if not wants and isinstance(finetune_rounds, int) and finetune_rounds > 0:
        raise ConfigError("job.phases", "finetune-rounds is set: add 'fine-tune' to the phases")


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_job(path: str | Path) -> Job:
    path = Path(path)
    data = read_toml(path, "job")
    return parse_job(data, path.resolve().parent, source=str(path))


def app_config_keys(app: Path) -> dict[str, Any]:
    """The run-config keys (flattened with dots) and defaults an app declares."""
    pyproject = app / "pyproject.toml"
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError("job.app", f"{app} has no pyproject.toml (not a Flower app)") from exc
    config = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})
    return _flatten(config)


def check_against_app(app: Path, overrides: dict[str, Scalar]) -> None:
    """ConfigError naming the first key the app does not declare (Flower would refuse the run)."""
    declared = app_config_keys(app)
    for key in overrides:
        if key not in declared:
            hint = "not declared"
            raise ConfigError(key, f"{hint}: {app / 'pyproject.toml'} has no [tool.flwr.app.config] '{key}'")


def toml_overrides(overrides: dict[str, Scalar]) -> str:
    """The overrides as a TOML document of quoted flat keys (Flower flattens it back)."""
    lines = []
    for key, value in overrides.items():
        if isinstance(value, bool):
            rendered = "true" if value else "false"
        elif isinstance(value, (int, float)):
            rendered = repr(value)
        else:
            rendered = json.dumps(value)  # a JSON string is a valid TOML basic string
        lines.append(f"{json.dumps(key)} = {rendered}")
    return "\n".join(lines) + "\n"
