"""visionfm-fed, hospital side: the ClientApp, site data and the visionfm-client CLI."""

from visionfm_core.telemetry import disable_telemetry

disable_telemetry()
