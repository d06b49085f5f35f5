"""Memory a process uses, for reports: the coordinator's and each simulated site's."""

from __future__ import annotations

import contextlib
import os
import resource
from pathlib import Path


def process_memory_mb() -> dict[str, float]:
    """This process's resident memory now and its peak so far, in MB (Linux /proc and getrusage;
    0 where the platform does not say)."""
    rss = 0.0
    with contextlib.suppress(OSError, IndexError, ValueError):
        rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return {"rss_mb": rss, "peak_rss_mb": float(peak)}
