"""The round-time split the server reports: overhead = round time minus the slowest site's compute."""

from __future__ import annotations

import pytest

from server.federation.timing import round_timing


def test_overhead_is_round_time_beyond_the_slowest_site() -> None:
    row = round_timing(10.0, {"a": 4.0, "b": 7.5, "c": 1.0})
    assert row["slowest_site_seconds"] == 7.5 and row["site_seconds_total"] == 12.5
    assert row["overhead_seconds"] == pytest.approx(2.5) and row["overhead_share"] == pytest.approx(0.25)
    assert row["sites_timed"] == 3


def test_a_round_without_timed_sites_is_all_overhead_and_never_negative() -> None:
    assert round_timing(3.0, {})["overhead_share"] == 1.0
    # Clocks on different machines: a site may report slightly more than the server measured.
    assert round_timing(1.0, {"a": 1.2})["overhead_seconds"] == 0.0
