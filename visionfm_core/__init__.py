"""visionfm_core: the ML library of visionfm-fed (no federation code; never imports flwr)."""

__version__ = "0.1.0"
