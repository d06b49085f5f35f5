"""Where the real, openly licensed eye images bundled with the package live (simulations/data/)."""

from __future__ import annotations

from pathlib import Path

# The bundled data ships inside the simulations package folder (package data).
DATA_DIR = Path(__file__).resolve().parents[2] / "simulations" / "data"
