"""What every bench script shares (not a bench itself: the smoke test runs `bench/[!_]*.py`)."""

from __future__ import annotations

import argparse
import platform
import subprocess


def cpu_model() -> str:
    """`lscpu`'s model name (the machine a number was measured on), or the best fallback there is."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if line.strip().lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def print_cpu() -> None:
    print(f"CPU: {cpu_model()}", flush=True)


def add_smoke_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, seconds: checks the bench still runs end to end (its numbers mean nothing)")
