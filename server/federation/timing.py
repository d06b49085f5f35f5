"""Where a round's time goes: the sites' own compute against everything else (messaging, waiting,
aggregation, secure-aggregation stages), from the seconds each site reports for its local work."""

from __future__ import annotations

from collections.abc import Mapping


def round_timing(round_seconds: float, site_seconds: Mapping[str, float]) -> dict[str, float]:
    """The numbers of one round's `timing` row.

    overhead = round time minus the slowest site's compute: what the federation adds on top of the
    sites working in parallel, as in deployment. In a simulation, sites share the machine's cores and
    queue for them, so the summed site compute is reported as well.
    """
    slowest = max(site_seconds.values(), default=0.0)
    overhead = max(round_seconds - slowest, 0.0)
    return {
        "round_seconds": round_seconds,
        "slowest_site_seconds": slowest,
        "site_seconds_total": float(sum(site_seconds.values())),
        "sites_timed": float(len(site_seconds)),
        "overhead_seconds": overhead,
        "overhead_share": overhead / round_seconds if round_seconds > 0 else 0.0,
    }
