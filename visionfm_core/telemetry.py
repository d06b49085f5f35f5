"""Keep Flower's and Ray's telemetry, update checks and runtime installs off unless a user opts in.

Hospitals must not phone home: these are set (as defaults, so an explicit opt-in still wins) before
flwr or ray is imported by any of our entry points.
"""

from __future__ import annotations

import os

PRIVACY_DEFAULTS = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_USAGE_STATS_PROMPT_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
}


def disable_telemetry() -> dict[str, str]:
    """Set the privacy defaults in this process's environment; returns the values in force."""
    for key, value in PRIVACY_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in PRIVACY_DEFAULTS}
