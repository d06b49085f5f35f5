"""Loading B-scans of vendor OCT exports one at a time, in random order (as training does): from the
frames decoded once at indexing, against parsing the export for every B-scan (the baseline, measured
in the same run). Uses the real Topcon samples under tests/unit/data/oct_vendor/.

    python bench/bench_vendor_oct.py [--repeats 20] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _bench import cpu_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SAMPLES = Path(__file__).resolve().parent.parent / "tests" / "unit" / "data" / "oct_vendor"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="passes over every B-scan")
    parser.add_argument("--smoke", action="store_true", help="a few passes only (CI)")
    args = parser.parse_args()
    repeats = 2 if args.smoke else args.repeats
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["VISIONFM_STATE_DIR"] = str(Path(scratch) / "state")
        from visionfm_core.data import vendor_oct
        from visionfm_core.data.site import open_site

        site = Path(scratch) / "site"
        site.mkdir()
        for name in ("fda_minimized.fda", "fds_minimized.fds"):
            shutil.copy(SAMPLES / name, site / name)
        items = open_site(site, "oct").items  # indexing converts each export once
        order = [item for _ in range(repeats) for item in items]
        random.Random(0).shuffle(order)

        started = time.perf_counter()
        for item in order:
            item.load()
        cached = time.perf_counter() - started

        for item in items:
            vendor_oct.frames_cache_path(item.source).unlink(missing_ok=True)
        started = time.perf_counter()
        for item in order:
            vendor_oct._cache.clear()  # the baseline: every B-scan parses its export
            item.load()
        parsed = time.perf_counter() - started
    print(f"CPU: {cpu_model()}")
    print(f"{len(order)} B-scan loads in random order: parse each time {parsed * 1e3 / len(order):.2f} ms/B-scan, "
          f"decoded once {cached * 1e3 / len(order):.2f} ms/B-scan")
    print(f"ratio (parse each time / decoded once): {parsed / max(cached, 1e-9):.1f}x")


if __name__ == "__main__":
    main()
