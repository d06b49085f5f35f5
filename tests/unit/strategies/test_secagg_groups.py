"""Modality-aware secure aggregation: each modality summed over its own holders, aborting alone."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from strategies.fedavg import SiteReply, aggregate_by_modality
from strategies.secagg import ModalitySecAggClient, ModalitySecAggServer, SecAggParams

from .model_arrays import random_arrays
from .secagg_driver import through_flower

HOLDINGS = {1: ("fundus", "oct"), 2: ("fundus",), 3: ("fundus", "oct"), 4: ("oct",), 5: ("fundus", "oct")}


def _roundtrip(messages):
    return {group: through_flower(payload) for group, payload in messages.items()}


def _run(global_model, updates, counts, params, drop_masked=(), keep_only=None):
    holders: dict[str, list[int]] = {}
    for node, modalities in HOLDINGS.items():
        for modality in modalities:
            holders.setdefault(modality, []).append(node)
    if keep_only is not None:
        holders = {m: nodes for m, nodes in holders.items() if m in keep_only}
    server = ModalitySecAggServer(holders, global_model, params)
    sites = {node: ModalitySecAggClient() for node in HOLDINGS}

    def call(node, method, messages, *args):
        # Between stages the site's state lives in context.state; rebuild it as a fresh process would.
        site = ModalitySecAggClient.from_state(sites[node].to_state())
        reply = getattr(site, method)(_roundtrip(messages), *args)
        sites[node] = site
        return _roundtrip(reply)

    messages = server.setup()
    messages = server.broadcast_keys({n: call(n, "setup", m) for n, m in messages.items()})
    messages = server.relay_shares({n: call(n, "share_keys", m) for n, m in messages.items()})
    for node, message in messages.items():
        reply = call(node, "masked_input", message, updates[node], counts[node])
        if node not in drop_masked:
            server.receive_masked(node, reply)
    messages = server.request_unmask()
    return server.finish({n: call(n, "unmask", m) for n, m in messages.items()})


@pytest.fixture
def federation(global_model):
    rng = np.random.default_rng(9)
    updates, counts = {}, {}
    for node, modalities in HOLDINGS.items():
        arrays = {}
        for modality in modalities:
            arrays.update(random_arrays(rng, scale=0.05, prefix=modality))
        updates[node] = arrays
        counts[node] = {m: int(rng.integers(10, 500)) for m in modalities}
    return updates, counts


def test_each_modality_is_summed_over_its_holders(global_model, federation):
    updates, counts = federation
    params = SecAggParams(max_weight=500)
    outcome = _run(global_model, updates, counts, params)
    assert outcome.aborted == {}
    assert outcome.results["fundus"].survivors == [1, 2, 3, 5]
    assert outcome.results["oct"].survivors == [1, 3, 4, 5]
    expected = aggregate_by_modality([SiteReply(str(n), updates[n], counts[n]) for n in HOLDINGS])
    mean = outcome.mean()
    assert set(mean) == set(expected)
    for key, value in expected.items():
        assert np.abs(mean[key] - value).max() < 1e-5


def test_a_modality_that_loses_too_many_sites_aborts_alone(global_model, federation, caplog):
    updates, counts = federation
    # Site 4 holds only oct and drops before masked input. With the default threshold (3 of 4) oct
    # survives that; with a threshold of 4 oct aborts while fundus, which lost nobody, still finishes.
    outcome = _run(global_model, updates, counts, SecAggParams(max_weight=500), drop_masked=(4,))
    assert outcome.aborted == {} and outcome.results["oct"].dropped == [4]
    strict = SecAggParams(max_weight=500, threshold=4, num_shares=4)
    with caplog.at_level(logging.WARNING, logger="strategies.secagg.groups"):
        outcome = _run(global_model, updates, counts, strict, drop_masked=(4,))
    assert set(outcome.aborted) == {"oct"} and set(outcome.results) == {"fundus"}
    abort = outcome.aborted["oct"]
    assert (abort.stage, abort.needed, abort.got) == ("masked input", 4, 3)
    assert all(key.startswith("fundus/") for key in outcome.mean())
    assert any("'oct' aborted" in record.getMessage() for record in caplog.records)


def test_a_modality_held_by_one_site_is_never_summed(global_model):
    holders = {"fundus": [1, 2, 3], "oct": [4]}
    server = ModalitySecAggServer(holders, global_model, SecAggParams(max_weight=500))
    assert set(server.servers) == {"fundus"} and server.aborted["oct"].stage == "setup"
    assert all("oct" not in groups for groups in server.setup().values())
