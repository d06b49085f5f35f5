"""ClientApp: return the received array plus this node's `site-value` (node config), after a delay."""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.audit import audit_mod

app = ClientApp(mods=[audit_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content.array_records["arrays"].to_numpy_ndarrays()
    delay = float(context.run_config.get("train-delay", 0.0))
    if delay > 0:
        time.sleep(delay)
    value = float(context.node_config.get("site-value", 1.0))
    reply = RecordDict(
        {
            "arrays": ArrayRecord([a + value for a in arrays]),
            "metrics": MetricRecord({"num-examples": 1, "site-value": value}),
        }
    )
    return Message(content=reply, reply_to=msg)
