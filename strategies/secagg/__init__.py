"""Secure aggregation (SecAgg+) over plain payload dicts, built on Flower's cryptographic primitives.

One protocol instance sums one group (a modality's encoder over the sites that hold it);
`ModalitySecAggServer` / `ModalitySecAggClient` run one instance per modality side by side.

Routing over Flower's Message API (server method -> message -> client method -> reply):

    server.setup()                 -> each node -> client.setup(msg)         -> public keys
    server.broadcast_keys(replies) -> each node -> client.share_keys(msg)    -> ciphertexts
    server.relay_shares(replies)   -> each node -> client.masked_input(msg, values, weight)
    server.receive_masked(node, reply)   (one reply at a time: the server keeps a running sum)
    server.request_unmask()        -> survivors -> client.unmask(msg)        -> shares
    server.finish(replies)         -> the weighted mean (SecAggResult / ModalitySecAggResult)

A node missing from `replies` has dropped out; fewer than the threshold raises `SecAggAbort`
(per group in the modality wrappers, which then set that group aside). Payloads are flat dicts:
`split_payload` turns one into (ConfigRecord values, ArrayRecord arrays). On a SuperNode keep
`client.to_state()` in `context.state` between messages and rebuild with `from_state`.

Send deltas from the global model, not weights: pick `clip_range` so w/max_weight * delta fits
(with central DP, clip_range = the DP clip norm: no coordinate of a clipped delta exceeds it), and
`max_weight` near the largest site's example count (a larger one costs quantisation precision).
The validation of `strategies.validation` cannot run on masked data: the client checks its own
update (keys, sizes and dtype first, NaN/Inf while quantising) before anything is sent.
"""

from strategies.secagg.client import SecAggClient
from strategies.secagg.errors import SecAggAbort, SecAggProtocolError
from strategies.secagg.groups import ModalitySecAggClient, ModalitySecAggResult, ModalitySecAggServer
from strategies.secagg.params import GroupConfig, Payload, SecAggParams, join_payload, split_payload
from strategies.secagg.server import SecAggResult, SecAggServer

__all__ = [
    "GroupConfig",
    "ModalitySecAggClient",
    "ModalitySecAggResult",
    "ModalitySecAggServer",
    "Payload",
    "SecAggAbort",
    "SecAggClient",
    "SecAggParams",
    "SecAggProtocolError",
    "SecAggResult",
    "SecAggServer",
    "join_payload",
    "split_payload",
]
