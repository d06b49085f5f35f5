"""visionfm-fed, coordinator side: the ServerApp, checkpoints, reports and the visionfm-server CLI."""

from visionfm_core.telemetry import disable_telemetry

disable_telemetry()
