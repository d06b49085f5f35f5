"""The hostile-site suite: findings of issue #14 replayed against a real coordinator and real hospitals on
127.0.0.1 (the processes users run, over real TLS sockets).

Fixtures for every module here: the deployment fixtures (tests/integration/deployment/conftest.py:
`processes`, `federation`, `coordinator`, `shared_federation`, `shared_coordinator`), and
`tampered_app(folder)`: the deployment app with the ClientApp of `tampered_site/` (the real app whose
training reply one site rewrites, see tampered_site/client_app.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

from server.ops.deploy_app import write_deployment_app
from tests.integration.deployment.conftest import (  # noqa: F401  (fixtures shared by the hostile suite)
    coordinator,
    federation,
    processes,
    shared_coordinator,
    shared_federation,
)

TAMPERED_PACKAGE = Path(__file__).parent / "tampered_site"
PLAN_ENV = "VISIONFM_TAMPER_PLAN"


def tampered_app(folder: Path) -> Path:
    """A Flower app project: the deployment app's config, the real ServerApp, the tampered ClientApp."""
    write_deployment_app(folder)
    pyproject = folder / "pyproject.toml"
    text = pyproject.read_text()
    real_client = 'clientapp = "client.app:app"'
    assert real_client in text
    pyproject.write_text(text.replace(real_client, 'clientapp = "tampered_site.client_app:app"'))
    shutil.copytree(TAMPERED_PACKAGE, folder / "tampered_site", ignore=shutil.ignore_patterns("__pycache__"),
                    dirs_exist_ok=True)
    return folder
