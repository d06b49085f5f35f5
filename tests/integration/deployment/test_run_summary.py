"""How `visionfm-server logs --run` reads a ServerApp log: kinds only, and a resumed job counted once.

The lines are the ServerApp's own wording (server/federation/rounds.py); the end-to-end check on real runs is in
test_federation.py and test_network_blip.py."""

from __future__ import annotations

from server.ops.run_summary import parse_server_log, parse_server_logs, rejection_kind, summarise_rounds

SECRET = "/data/patients/0042/scan.png"


def test_rejections_keep_the_kind_and_drop_the_text() -> None:
    kinds = {
        f"site error: DataError at the site (details in the site's log) {SECRET}": "site error (DataError)",
        f"site error: <class 'ValueError'>:<'cannot read {SECRET}'>": "site error (ValueError)",
        "site error: Error: Node Unavailable — The destination node failed to report": "site error (Node Unavailable)",
        "site error: PrivacyBudgetExceeded: epsilon 8.1 > 8": "site error (PrivacyBudgetExceeded)",
        "site site-2: 3 of 10 values are NaN or Inf (fundus/backbone.w)": "invalid update (non-finite values)",
        "site site-2: shape (3,), expected (4,) (fundus/backbone.w)": "invalid update (wrong shape)",
        "undecodable int8 update: bad header": "undecodable update",
    }
    for reason, kind in kinds.items():
        assert rejection_kind(reason) == kind
    log = "\n".join(f"11/28/2026 11:39:51:WARNING:round 2: update from site-1 rejected: {r}" for r in kinds)
    events = parse_server_log(log)
    assert [r["kind"] for r in events[2].rejected] == list(kinds.values())
    assert SECRET not in repr(events)


def test_a_resumed_job_counts_each_round_once() -> None:
    first = (
        "WARNING:round 1: update from site-3 rejected: site error: Error: Node Unavailable — x\n"
        "WARNING:round 3 train: 1 site(s) did not answer within 45s\n"  # round 3 died with the coordinator
    )
    second = "WARNING:round 3 train: 2 site(s) did not answer within 45s\nERROR:round 3 failed: 0 accepted update(s)\n"
    events = parse_server_logs([(first, 2), (second, None)])
    assert events[1].rejected == [{"site": "site-3", "kind": "site error (Node Unavailable)"}]
    assert events[3].unanswered == 2 and events[3].failed == "too few accepted updates"


def test_rounds_carry_each_sites_numbers() -> None:
    rows = [
        {"round": 1, "site": "site-1", "modality": "fundus", "phase": "train", "epsilon": 2.5, "delta": 1e-5},
        {"round": 1, "site": "site-1", "modality": "all", "phase": "transport", "bytes_sent": 1000.0},
        {"round": 1, "site": "server", "modality": "all", "phase": "timing", "round_seconds": 10.0,
         "overhead_share": 0.25},
    ]
    (summary,) = summarise_rounds(rows, {}, [1])
    assert summary.answered == ["site-1"]
    assert summary.sites["site-1"] == {"fundus/epsilon": 2.5, "fundus/delta": 1e-5, "bytes_sent": 1000.0}
    assert summary.timing == {"round_seconds": 10.0, "overhead_share": 0.25}
