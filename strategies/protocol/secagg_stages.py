"""The site's side of secure aggregation (SecAgg+) over Flower messages.

After local training the site keeps its update (the delta from the global model) in `context.state`
and sends only numbers. The server then drives the SecAgg+ stages with QUERY messages; each stage's
client state survives in `context.state` (a SuperNode starts a fresh process per message). The
masked vector is the only thing derived from the weights that ever leaves the site.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from strategies.secagg import ModalitySecAggClient, join_payload, split_payload
from strategies.secagg.params import Payload

STAGE_KEY = "secagg-stage"
GROUP_PREFIX = "secagg."
PENDING = "secagg-pending-update"
WEIGHTS = "secagg-weights"
CLIENT_STATE = "secagg-client"
STAGES = ("setup", "share-keys", "masked-input", "unmask")


def keep_update(context: Context, global_arrays: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray],
                weights: Mapping[str, int]) -> None:
    """Store this round's delta (trained - global) and example counts on the site for the secure sum."""
    delta = {k: np.asarray(v, np.float32) - np.asarray(global_arrays[k], np.float32) for k, v in trained.items()}
    context.state[PENDING] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in delta.items()})
    context.state[WEIGHTS] = ConfigRecord({k: int(v) for k, v in weights.items()})


def pack_groups(messages: Mapping[str, Payload]) -> RecordDict:
    """One ConfigRecord and one ArrayRecord per modality group."""
    content = RecordDict()
    for group, payload in messages.items():
        config, arrays = split_payload(payload)
        content[GROUP_PREFIX + group] = ConfigRecord(config)
        if arrays:
            content[GROUP_PREFIX + group + ".arrays"] = ArrayRecord(
                {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return content


def unpack_groups(content: RecordDict) -> dict[str, Payload]:
    """The inverse of `pack_groups`."""
    groups: dict[str, Payload] = {}
    for name, record in content.config_records.items():
        if not name.startswith(GROUP_PREFIX):
            continue
        group = name[len(GROUP_PREFIX):]
        arrays_record = content.array_records.get(name + ".arrays")
        arrays = {} if arrays_record is None else {k: a.numpy() for k, a in arrays_record.items()}
        groups[group] = join_payload(dict(record), arrays)
    return groups


def handle_stage(stage: str, messages: Mapping[str, Payload], context: Context) -> dict[str, Payload]:
    """Run one SecAgg+ stage for every group addressed to this site; persist the client state."""
    if stage not in STAGES:
        raise ValueError(f"unknown secure-aggregation stage {stage!r}")
    if stage == "setup":
        client = ModalitySecAggClient()
        replies = client.setup(messages)
    else:
        saved: dict[str, Any] = dict(context.state.config_records.get(CLIENT_STATE, ConfigRecord()))
        client = ModalitySecAggClient.from_state(saved)
        if stage == "share-keys":
            replies = client.share_keys(messages)
        elif stage == "masked-input":
            pending = context.state.array_records.get(PENDING)
            if pending is None:
                raise ValueError("no trained update is waiting for secure aggregation on this site")
            values = {k: a.numpy() for k, a in pending.items()}
            weights = {k: int(str(v)) for k, v in context.state.config_records[WEIGHTS].items()}
            replies = client.masked_input(messages, values, weights)
        else:
            replies = client.unmask(messages)
            # The protocol is over for this round: drop the update and the keys.
            for key in (PENDING, WEIGHTS):
                if key in context.state:
                    del context.state[key]
    context.state[CLIENT_STATE] = ConfigRecord(client.to_state())
    return replies
