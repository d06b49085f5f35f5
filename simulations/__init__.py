"""visionfm-fed simulations: scenarios, partitioners, bundled data and `visionfm simulate`."""

from visionfm_core.telemetry import disable_telemetry

disable_telemetry()
