"""Flower's Grid as the coordinator's round loop uses it, answered in process by site functions.

The Federation (and FineTunePhase) under test are the real ones; each site is a function from the
server's real Flower message to a real Flower reply, so honest and tampered replies go through exactly
the code a deployment runs (tests/integration/hostile replays the same attacks over real sockets)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import reply_info
from strategies.protocol.records import MANIFEST_KEY, arrays_to_record, record_to_numpy

Site = Callable[[Message, Context], Message]
SITE_NAMES = ("hospital-1", "hospital-2", "hospital-3", "hostile")  # node n reports site-index n - 1


class SiteGrid:
    """Answers every pushed message at once with the addressed site's function."""

    def __init__(self, sites: dict[int, Site]) -> None:
        self.sites = sites
        self.contexts = {node: Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
                         for node in sites}
        self.replies: dict[str, Message] = {}
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # the ServerApp's identity

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata._message_id = uuid.uuid4().hex  # what the SuperLink assigns
            node = message.metadata.dst_node_id
            TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, node
            self.replies[message.metadata.message_id] = self.sites[node](message, self.contexts[node])
            TaskIdentity.node_id = 0
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def reply(msg: Message, content: RecordDict) -> Message:
    return Message(content=content, reply_to=msg)


def error_reply(msg: Message, reason: str = "RuntimeError: training diverged") -> Message:
    return Message(Error(code=0, reason=reason), reply_to=msg)


@dataclass
class HonestSite:
    """Moves every received weight by `step` and reports `examples` per modality it holds."""

    step: float
    examples: int
    sent: list[dict[str, np.ndarray]] = field(default_factory=list)

    def train_content(self, msg: Message, node: int) -> RecordDict:
        received = record_to_numpy(msg.content.array_records["arrays"])
        arrays = {k: (v + np.float32(self.step)).astype(np.float32) for k, v in received.items()}
        self.sent.append(arrays)
        modalities = sorted({k.split("/", 1)[0] for k in arrays})
        metrics = {f"{m}/num-examples": float(self.examples) for m in modalities}
        metrics.update({f"{m}/loss": 1.0 for m in modalities})
        metrics["site-index"] = float(node - 1)  # the server names the site after SITE_NAMES[index]
        return RecordDict({"arrays": arrays_to_record(arrays), "metrics": MetricRecord(metrics),
                           "reply": reply_info(msg)})

    def __call__(self, msg: Message, context: Context) -> Message:
        if msg.metadata.message_type == MessageType.EVALUATE:
            return reply(msg, RecordDict({"metrics": MetricRecord({"num-examples": 4.0,
                                                                    "site-index": float(context.node_id - 1)})}))
        return reply(msg, self.train_content(msg, context.node_id))


Tamper = Callable[[Message, RecordDict], RecordDict]


@dataclass
class TamperedSite(HonestSite):
    """An honest site whose training reply `tamper` rewrites (given the server's message and the honest reply)."""

    tamper: Tamper | None = None

    def __call__(self, msg: Message, context: Context) -> Message:
        if msg.metadata.message_type == MessageType.EVALUATE or self.tamper is None:
            return super().__call__(msg, context)
        return reply(msg, self.tamper(msg, self.train_content(msg, context.node_id)))


def with_count(value: float) -> Tamper:
    def tamper(msg: Message, content: RecordDict) -> RecordDict:
        metrics = dict(content.metric_records["metrics"])
        for key in [k for k in metrics if k.endswith("/num-examples")]:
            metrics[key] = value
        content["metrics"] = MetricRecord(metrics)
        return content

    return tamper


def with_manifest(raw: bytes) -> Tamper:
    def tamper(msg: Message, content: RecordDict) -> RecordDict:
        content.array_records["arrays"][MANIFEST_KEY] = Array.from_numpy_ndarray(np.frombuffer(raw, dtype=np.uint8))
        return content

    return tamper


def shifted(amount: float) -> Tamper:
    """Adds `amount` to every weight (the "+1e4 to every weight" attack)."""

    def tamper(msg: Message, content: RecordDict) -> RecordDict:
        arrays = record_to_numpy(content.array_records["arrays"])
        moved = {k: (v + np.float32(amount)).astype(np.float32) for k, v in arrays.items()}
        content["arrays"] = arrays_to_record(moved)
        return content

    return tamper


def replaying(first_round: int, relabel: bool) -> Tamper:
    """Sends round `first_round`'s reply again in every later round: as it was, or (relabel) with this
    round's round number and model digest, i.e. only the arrays are stale."""
    kept: dict[str, RecordDict] = {}

    def tamper(msg: Message, content: RecordDict) -> RecordDict:
        server_round = int(str(msg.content.config_records["config"]["server-round"]))
        if server_round == first_round:
            kept["reply"] = content
            return content
        if server_round < first_round or "reply" not in kept:
            return content
        old = kept["reply"]
        info: ConfigRecord = reply_info(msg) if relabel else old.config_records["reply"]
        return RecordDict({"arrays": old.array_records["arrays"], "metrics": old.metric_records["metrics"],
                           "reply": info})

    return tamper
