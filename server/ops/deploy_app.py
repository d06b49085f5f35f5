"""The deployment app: a Flower app project that carries configuration, not code.

`flwr run` ships a FAB (the app's files) to every SuperNode, and each hospital then executes the code
in it. The deployment app generated here holds only a pyproject: its components are the ServerApp
and ClientApp of the visionfm-fed package installed at each party, and its `[tool.flwr.app.config]`
declares every run-config key (with its default) so that a job may set any of them. A coordinator
therefore chooses hyperparameters, never the code a hospital runs: that is the version the hospital
installed. All parties must install the same release (the app version names it).
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

from server.ops.jobs import toml_overrides
from visionfm_core.run_config import RunConfig
from visionfm_core.ssl.config import SSLConfig

APP_NAME = "visionfm-fed-deployment"


def declared_config() -> dict[str, Any]:
    """Every run-config key with its default, flat as Flower passes them (ssl.* included)."""
    run = RunConfig()
    flat: dict[str, Any] = dict(run.to_flat())
    for key, value in SSLConfig().to_dict().items():
        if key.replace("_", "-") in flat:
            continue  # run-level keys (objective, batch-size, share-head) win over ssl.* ones anyway
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)  # pairs travel as "a,b" (Flower has no lists)
        if value is None:
            continue
        flat[f"ssl.{key.replace('_', '-')}"] = value
    flat["ssl.drop-path-rate"] = 0.0  # read by the encoder spec, not by SSLConfig
    from strategies.protocol.dp_config import DPConfig

    for key, value in DPConfig().to_dict().items():
        # DP-SGD settings (used when dp = true); "auto" stands for an unset value (Flower has no None).
        flat[f"privacy.{key.replace('_', '-')}"] = "auto" if value is None else value
    flat.pop("phase", None)  # set by the ServerApp for each phase, never by a job
    return flat


def check_run_config(overrides: dict[str, Any]) -> RunConfig:
    """The job's run config as the ServerApp and every site will parse it (the deployment app's
    defaults updated with `overrides`): a bad value fails here, before Flower sees the run, with a
    ConfigError naming its key (the ServerApp and each site check again on their side)."""
    return RunConfig.from_flat({**declared_config(), **overrides})


def package_version() -> str:
    try:
        return metadata.version("visionfm-fed")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def write_deployment_app(folder: Path) -> Path:
    """Write (or refresh) the deployment app project in `folder`; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    header = f"""[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{APP_NAME}"
version = "{package_version()}"
description = "visionfm-fed deployment: configuration only; each party runs its installed visionfm-fed."
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "visionfm-fed"

[tool.flwr.app.components]
serverapp = "server.federation.app:app"
clientapp = "client.app:app"

[tool.flwr.app.config]
"""
    text = header + toml_overrides(declared_config())
    path = folder / "pyproject.toml"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return folder
