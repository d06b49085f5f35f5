"""How the round loop rides out SuperLink faults it cannot prevent: a 5xx answer while replies are
pulled, and a site of the last round that is restarting when the next round begins. The SuperLink's
faults cannot be provoked on demand, so a scripted stand-in for Flower's Grid plays them; real
deployments exercise the same paths in tests/integration/deployment."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from server.federation.rounds import Federation
from visionfm_core.run_config import RunConfig


class ScriptedGrid:
    """Answers `get_node_ids` from a script (one list per call, the last repeats) and fails
    `pull_messages` with the given exception on its first calls."""

    def __init__(self, node_lists: list[list[int]], pull_failures: list[Exception] | None = None) -> None:
        self.node_lists = node_lists
        self.pull_failures = list(pull_failures or [])
        self.calls = 0

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        return self.node_lists[min(self.calls, len(self.node_lists)) - 1]

    def pull_messages(self, message_ids: object) -> list[object]:
        if self.pull_failures:
            raise self.pull_failures.pop(0)
        return []


def _status_error(code: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "https://127.0.0.1/v1/runtime/pull-messages")
    return httpx.HTTPStatusError("refused", request=request, response=httpx.Response(code, request=request))


def _federation(grid: ScriptedGrid, tmp_path: Path, **changes: object) -> Federation:
    cfg = RunConfig(out_dir=str(tmp_path), min_sites=2, round_timeout=30, **changes)  # type: ignore[arg-type]
    return Federation(grid, cfg, {})  # type: ignore[arg-type]


def test_a_superlink_500_while_pulling_is_logged_and_polled_again(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    grid = ScriptedGrid([[1, 2]], [_status_error(500), httpx.ConnectError("reset")])
    federation = _federation(grid, tmp_path)
    with caplog.at_level(logging.WARNING):
        assert federation._pull({"m1"}) == []
        assert federation._pull({"m1"}) == []
    assert federation._pull({"m1"}) == [] and not grid.pull_failures
    assert "HTTPStatusError" in caplog.text and "ConnectError" in caplog.text


def test_a_client_error_from_the_superlink_is_not_hidden(tmp_path: Path) -> None:
    federation = _federation(ScriptedGrid([[1, 2]], [_status_error(403)]), tmp_path)
    with pytest.raises(httpx.HTTPStatusError):
        federation._pull({"m1"})


def test_a_site_of_the_last_round_gets_the_grace_period_to_come_back(tmp_path: Path) -> None:
    # Round 1 went to nodes 1, 2, 3; node 3 restarts: offline for two polls, then back.
    grid = ScriptedGrid([[1, 2, 3], [1, 2], [1, 2], [1, 2, 3]])
    federation = _federation(grid, tmp_path, rejoin_grace=30.0)
    assert federation._wait_for_nodes() == [1, 2, 3]
    assert federation._wait_for_nodes() == [1, 2, 3] and grid.calls == 4


def test_a_site_that_stays_away_delays_one_round_only(tmp_path: Path) -> None:
    grid = ScriptedGrid([[1, 2, 3], [1, 2]])
    federation = _federation(grid, tmp_path, rejoin_grace=1.5)
    assert federation._wait_for_nodes() == [1, 2, 3]
    assert federation._wait_for_nodes() == [1, 2]  # after the grace period: polled more than once
    waited = grid.calls
    assert waited > 2
    assert federation._wait_for_nodes() == [1, 2] and grid.calls == waited + 1  # not waited for again


def test_without_grace_the_round_goes_on_with_the_sites_online(tmp_path: Path) -> None:
    grid = ScriptedGrid([[1, 2, 3], [1, 2]])
    federation = _federation(grid, tmp_path, rejoin_grace=0.0)
    assert federation._wait_for_nodes() == [1, 2, 3]
    assert federation._wait_for_nodes() == [1, 2] and grid.calls == 2
