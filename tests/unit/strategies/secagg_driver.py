"""An in-process driver for the SecAgg+ stages: routes payloads like the ServerApp would.

Every payload crosses a real Flower ConfigRecord/ArrayRecord boundary, and client state round-trips
through a ConfigRecord between stages, as on a SuperNode that starts a fresh process per message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from strategies.secagg import (
    SecAggClient,
    SecAggParams,
    SecAggResult,
    SecAggServer,
    join_payload,
    split_payload,
)


def through_flower(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Pack a payload into Flower records and unpack it again."""
    config, arrays = split_payload(dict(payload))
    config_record = ConfigRecord(config)
    array_record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return join_payload(dict(config_record), {k: a.numpy() for k, a in array_record.items()})


def stored(client: SecAggClient) -> SecAggClient:
    """The client after a trip through `context.state` (a ConfigRecord)."""
    return SecAggClient.from_state(dict(ConfigRecord(client.to_state())))


@dataclass
class Run:
    server: SecAggServer
    clients: dict[int, SecAggClient]
    sent: dict[int, np.ndarray] = field(default_factory=dict)  # masked vectors as the server saw them
    seeds: dict[int, bytes] = field(default_factory=dict)  # self-mask seeds, captured for attack tests
    outcome: SecAggResult | None = None

    @property
    def result(self) -> SecAggResult:
        if self.outcome is None:
            raise RuntimeError("the protocol did not finish")
        return self.outcome


def run_protocol(
    values: Mapping[int, Mapping[str, np.ndarray]],
    weights: Mapping[int, int],
    params: SecAggParams,
    drop_before: Mapping[str, set[int]] | None = None,
    tallies: Mapping[int, Mapping[str, int]] | None = None,
    group: str = "fundus",
) -> Run:
    """Run every stage; nodes in drop_before[stage] stop answering from that stage on.

    Stages: "keys" (stage 1), "shares" (3), "masked" (4), "unmask" (5).
    """
    drops = {stage: set(nodes) for stage, nodes in (drop_before or {}).items()}
    gone: set[int] = set()
    nodes = sorted(values)
    shapes = {k: v.shape for k, v in values[nodes[0]].items()}
    server = SecAggServer(group, nodes, params, shapes)
    run = Run(server, {node: SecAggClient() for node in nodes})

    def answering(stage: str, messages: Mapping[int, Any]) -> list[int]:
        gone.update(drops.get(stage, set()))
        return [node for node in messages if node not in gone]

    def step(node: int, method: str, message: Mapping[str, Any], *args: Any) -> dict[str, Any]:
        client = stored(run.clients[node])
        reply = getattr(client, method)(through_flower(message), *args)
        run.clients[node] = client
        return through_flower(reply)

    messages = server.setup()
    replies = {n: step(n, "setup", messages[n]) for n in answering("keys", messages)}
    messages = server.broadcast_keys(replies)
    replies = {n: step(n, "share_keys", messages[n]) for n in answering("shares", messages)}
    run.seeds = {n: run.clients[n].seed for n in replies}
    messages = server.relay_shares(replies)
    for node in answering("masked", messages):
        extra = (dict((tallies or {}).get(node, {})),)
        reply = step(node, "masked_input", messages[node], values[node], weights[node], *extra)
        run.sent[node] = reply["masked"].copy()  # the server sums into the first vector it accepts
        server.receive_masked(node, reply)
    messages = server.request_unmask()
    replies = {n: step(n, "unmask", messages[n]) for n in answering("unmask", messages)}
    run.outcome = server.finish(replies)
    return run
