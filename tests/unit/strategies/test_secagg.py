"""SecAgg+ with real crypto, in process: correct sums, masked inputs, dropouts, clean aborts."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.fedavg import weighted_average
from strategies.secagg import SecAggAbort, SecAggClient, SecAggParams, SecAggProtocolError, SecAggServer
from strategies.secagg.client import self_context
from strategies.secagg.masking import MaskStream, header_length, stream_key

from .secagg_driver import run_protocol, stored, through_flower

SHAPES = {
    "fundus/blocks.0.attn.qkv.weight": (48, 16),
    "fundus/cls_token": (1, 1, 16),
    "fundus/norm.bias": (16,),
}
NODES = [11, 22, 33, 44, 55]


def _site_values(seed: int, scale: float = 0.05) -> dict[int, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {n: {k: rng.normal(0, scale, s).astype(np.float32) for k, s in SHAPES.items()} for n in NODES}


def _weights(seed: int) -> dict[int, int]:
    rng = np.random.default_rng(seed)
    return {n: int(rng.integers(50, 1000)) for n in NODES}


def _error_bound(params: SecAggParams, weights: dict[int, int], survivors: list[int]) -> float:
    """Each site's rounding moves w*x by under 1.5 steps; the mean divides by sum(w) / max_weight."""
    step = 2 * params.clip_range / (params.levels - 1)
    return len(survivors) * 1.5 * step * params.max_weight / sum(weights[n] for n in survivors)


def _assert_matches_plain(result, values, weights, survivors, params):
    expected = weighted_average([(values[n], float(weights[n])) for n in survivors])
    bound = _error_bound(params, weights, survivors)
    for key, value in expected.items():
        assert result.mean[key].shape == value.shape and result.mean[key].dtype == np.float32
        # float32 output adds at most one ulp of the (small) values on top of the quantisation bound.
        assert np.abs(result.mean[key] - value).max() <= bound + 1e-7
    assert result.total_weight == sum(weights[n] for n in survivors)
    assert result.survivors == survivors


def test_secure_mean_equals_plain_weighted_averaging_within_quantisation_error():
    values, weights = _site_values(0), _weights(0)
    params = SecAggParams(max_weight=1000)
    run = run_protocol(values, weights, params)
    _assert_matches_plain(run.result, values, weights, NODES, params)
    assert run.result.dropped == [] and run.result.clipped_values == 0
    # Coarse quantisation makes the bound matter: still within it, and no longer exact.
    coarse = SecAggParams(max_weight=1000, levels=1 << 10)
    run = run_protocol(values, weights, coarse)
    _assert_matches_plain(run.result, values, weights, NODES, coarse)


def test_what_the_server_receives_from_one_site_is_masked():
    # Large, structured values so that any leak would show up as correlation.
    rng = np.random.default_rng(5)
    big = {"fundus/w": (64, 64)}
    values = {n: {"fundus/w": rng.normal(0, 0.3, big["fundus/w"]).astype(np.float32)} for n in NODES}
    weights = dict.fromkeys(NODES, 100)
    params = SecAggParams(max_weight=100, clip_range=2.0)
    run = run_protocol(values, weights, params)
    assert run.result.clipped_values == 0
    node = NODES[2]
    values_at = slice(header_length(run.server.config), None)  # the header (weight, counts) comes first
    sent = run.sent[node][values_at].astype(np.float64)
    plain = values[node]["fundus/w"].ravel().astype(np.float64)
    count = plain.size
    # Uncorrelated with the site's update, and uniform over the 32-bit words.
    assert abs(np.corrcoef(sent, plain)[0, 1]) < 5 / np.sqrt(count)
    assert np.mean(sent) / 2**32 == pytest.approx(0.5, abs=5 * np.sqrt(1 / 12 / count))
    top_bytes = np.bincount((run.sent[node] >> 24).astype(np.int64), minlength=256)
    chi_square = float(np.sum((top_bytes - top_bytes.mean()) ** 2 / top_bytes.mean()))
    assert chi_square < 255 + 6 * np.sqrt(2 * 255)
    # Even with the site's self-mask seed (which the server rebuilds), the pair masks still hide it.
    config = run.server.config
    self_key = stream_key(run.seeds[node], config, self_context(config.group))
    self_mask = MaskStream(self_key, config.vector_length).next(config.vector_length)
    without_self = (run.sent[node] - self_mask)[values_at].astype(np.float64)
    assert abs(np.corrcoef(without_self, plain)[0, 1]) < 5 / np.sqrt(count)
    # Meanwhile the sum is right.
    _assert_matches_plain(run.result, values, weights, NODES, params)


@pytest.mark.parametrize("stage", ["keys", "shares", "masked", "unmask"])
def test_a_site_dropping_out_does_not_stop_the_round(stage):
    values, weights = _site_values(1), _weights(1)
    params = SecAggParams(max_weight=1000)
    run = run_protocol(values, weights, params, drop_before={stage: {33}})
    # A site that sent its masked vector before dropping still counts; earlier dropouts do not.
    survivors = NODES if stage == "unmask" else [n for n in NODES if n != 33]
    _assert_matches_plain(run.result, values, weights, survivors, params)
    assert run.result.dropped == ([33] if stage == "masked" else [])


def test_two_dropouts_at_masked_input_on_a_sparse_ring():
    # Seven sites, neighbourhoods of five (SecAgg+ ring), threshold three: masks do not span everyone.
    rng = np.random.default_rng(2)
    nodes = [101, 102, 103, 104, 105, 106, 107]
    values = {n: {"fundus/w": rng.normal(0, 0.1, (10, 10)).astype(np.float32)} for n in nodes}
    weights = {n: int(rng.integers(1, 100)) for n in nodes}
    params = SecAggParams(num_shares=5, threshold=3, max_weight=100)
    run = run_protocol(values, weights, params, drop_before={"masked": {102, 106}})
    assert run.server.config.num_shares == 5
    assert all(len(members) == 5 for members in run.server._round.neighbourhood.values())
    survivors = [n for n in nodes if n not in (102, 106)]
    _assert_matches_plain(run.result, values, weights, survivors, params)
    assert run.result.dropped == [102, 106]


@pytest.mark.parametrize(
    ("stage", "dropped", "abort_stage", "got"),
    [
        ("keys", {11, 22, 33}, "public keys", 2),
        ("shares", {11, 22, 33}, "share keys", 2),
        ("masked", {11, 22, 33}, "masked input", 2),
        ("unmask", {11, 22, 33}, "unmask", 2),
    ],
)
def test_below_threshold_the_round_aborts_naming_the_stage_and_counts(stage, dropped, abort_stage, got):
    values, weights = _site_values(3), _weights(3)
    params = SecAggParams(max_weight=1000)  # five sites -> threshold 3
    with pytest.raises(SecAggAbort) as caught:
        run_protocol(values, weights, params, drop_before={stage: dropped})
    abort = caught.value
    assert (abort.group, abort.stage, abort.needed, abort.got) == ("fundus", abort_stage, 3, got)
    assert f"stage '{abort_stage}'" in str(abort) and "needed 3, got 2" in str(abort)


def test_tallies_and_clipped_values_are_summed_exactly():
    values, weights = _site_values(4, scale=0.05), _weights(4)
    values[44]["fundus/norm.bias"][:3] = 50.0  # beyond clip_range after weighting: clipped, and counted
    params = SecAggParams(max_weight=1000, tally_names=("unclipped", "steps"))
    tallies = {n: {"unclipped": int(n != 44), "steps": n} for n in NODES}
    run = run_protocol(values, weights, params, tallies=tallies)
    assert run.result.tallies == {"unclipped": 4, "steps": sum(NODES)}
    assert run.result.clipped_values == 3


def test_client_rejects_bad_updates_before_masking():
    values, weights = _site_values(6), _weights(6)
    values[22]["fundus/cls_token"][0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="fundus/cls_token"):
        run_protocol(values, weights, SecAggParams(max_weight=1000))
    values = _site_values(6)
    with pytest.raises(ValueError, match="max_weight"):
        run_protocol(values, {**weights, 22: 5000}, SecAggParams(max_weight=1000))
    values[22]["fundus/extra"] = np.zeros(2, np.float32)
    with pytest.raises(KeyError, match="fundus/extra"):
        run_protocol(values, weights, SecAggParams(max_weight=1000))


def _to_masking_stage(nodes=(1, 2, 3)):
    params = SecAggParams(max_weight=10)
    server = SecAggServer("oct", list(nodes), params, {"oct/w": (4,)})
    clients = {n: SecAggClient() for n in nodes}
    messages = server.setup()
    keys = server.broadcast_keys({n: clients[n].setup(messages[n]) for n in nodes})
    shares = server.relay_shares({n: clients[n].share_keys(keys[n]) for n in nodes})
    return server, clients, shares


def test_clients_refuse_messages_that_break_the_protocol():
    server, clients, shares = _to_masking_stage()
    value = {"oct/w": np.ones(4, np.float32)}
    # Out of order.
    with pytest.raises(SecAggProtocolError, match="stage"):
        clients[1].unmask({"survivors": [0], "dropped": [], "num_survivors": 3})
    # A ciphertext relayed to the wrong site cannot be decrypted there.
    wrong = dict(shares[3])
    wrong["ciphertexts"] = list(shares[2]["ciphertexts"])
    wrong["sources"] = list(shares[2]["sources"])
    with pytest.raises(SecAggProtocolError):
        stored(clients[3]).masked_input(wrong, value, 5)
    for node in (1, 2, 3):
        server.receive_masked(node, clients[node].masked_input(shares[node], value, 5))
    requests = server.request_unmask()
    # Asking for both masks of one neighbour would unmask it: refused.
    greedy = {**requests[1], "dropped": [requests[1]["survivors"][-1]]}
    with pytest.raises(SecAggProtocolError, match="both survive and drop"):
        clients[1].unmask(greedy)
    result = server.finish({n: clients[n].unmask(requests[n]) for n in (1, 2, 3)})
    assert np.allclose(result.mean["oct/w"], 1.0, atol=1e-5)


def test_server_drops_malformed_replies_and_ignores_strangers():
    server, clients, shares = _to_masking_stage(nodes=(1, 2, 3, 4))
    value = {"oct/w": np.full(4, 0.5, np.float32)}
    assert not server.receive_masked(99, {"masked": np.zeros(7, np.uint32)})
    assert not server.receive_masked(1, {"masked": np.zeros(3, np.uint32)})  # wrong length: node 1 dropped
    for node in (2, 3, 4):
        assert server.receive_masked(node, clients[node].masked_input(shares[node], value, 5))
    assert not server.receive_masked(2, {"masked": np.zeros(server.config.vector_length, np.uint32)})
    clients[1].masked_input(shares[1], value, 5)
    requests = server.request_unmask()
    assert set(requests) == {2, 3, 4}
    result = server.finish({n: clients[n].unmask(requests[n]) for n in requests})
    assert result.dropped == [1] and np.allclose(result.mean["oct/w"], 0.5, atol=1e-5)


def test_every_message_and_the_client_state_fit_flower_records():
    _, clients, shares = _to_masking_stage()
    for node, message in shares.items():
        assert through_flower(message)["ciphertexts"] == message["ciphertexts"]
        restored = stored(clients[node])
        assert restored.to_state() == clients[node].to_state()


def test_sites_whose_neighbours_dropped_are_pruned_and_the_round_goes_on():
    # Ring of seven with neighbourhoods of three (threshold two): when both neighbours of site 103
    # drop before sharing keys, nobody could rebuild 103's masks, so it is left out rather than
    # breaking the sum.
    rng = np.random.default_rng(8)
    nodes = [101, 102, 103, 104, 105, 106, 107]
    values = {n: {"fundus/w": rng.normal(0, 0.1, (6,)).astype(np.float32)} for n in nodes}
    weights = {n: int(rng.integers(1, 100)) for n in nodes}
    params = SecAggParams(num_shares=3, threshold=2, max_weight=100)
    run = run_protocol(values, weights, params, drop_before={"shares": {102, 104}})
    _assert_matches_plain(run.result, values, weights, [101, 105, 106, 107], params)


def test_a_malformed_public_key_drops_only_its_sender():
    params = SecAggParams(max_weight=10)
    nodes = [1, 2, 3, 4]
    server = SecAggServer("oct", nodes, params, {"oct/w": (3,)})
    clients = {n: SecAggClient() for n in nodes}
    messages = server.setup()
    replies = {n: clients[n].setup(messages[n]) for n in nodes}
    replies[2] = {**replies[2], "pk_mask": b"-----BEGIN PUBLIC KEY-----\nnot a key\n"}
    keys = server.broadcast_keys(replies)
    assert set(keys) == {1, 3, 4}
    shares = server.relay_shares({n: clients[n].share_keys(keys[n]) for n in keys})
    for node in shares:
        server.receive_masked(node, clients[node].masked_input(shares[node], {"oct/w": np.ones(3, np.float32)}, 2))
    requests = server.request_unmask()
    result = server.finish({n: clients[n].unmask(requests[n]) for n in requests})
    assert result.survivors == [1, 3, 4] and np.allclose(result.mean["oct/w"], 1.0, atol=1e-5)


def test_the_server_sums_into_a_writable_first_vector_and_copies_a_read_only_one():
    for writable in (True, False):
        server, clients, shares = _to_masking_stage()
        values = {1: 0.25, 2: 0.5, 3: 0.75}
        replies = {
            n: clients[n].masked_input(shares[n], {"oct/w": np.full(4, v, np.float32)}, 5) for n, v in values.items()
        }
        first = replies[1]["masked"]
        first.setflags(write=writable)
        sent = first.copy()
        for node in (1, 2, 3):
            assert server.receive_masked(node, replies[node])
        requests = server.request_unmask()
        result = server.finish({n: clients[n].unmask(requests[n]) for n in requests})
        assert np.allclose(result.mean["oct/w"], 0.5, atol=1e-5)
        # A read-only vector is never written to; a writable one was taken over as the running sum.
        assert np.array_equal(first, sent) != writable
