"""Stock Flower strategies on this project's packed records.

A site packs its arrays into one flat buffer per dtype plus a manifest (`records.py`). A stock Flower
strategy (`flwr.serverapp.strategy.FedAvg`, `FedProx`, `FedMedian`, ...) averages an ArrayRecord key by
key, so on packed replies it would average the flat buffers and the manifest's bytes and return a
record nobody can read. `PackedRecordsStrategy` wraps such a strategy: every reply's ArrayRecords are
unpacked into one `Array` per tensor before the wrapped strategy aggregates them, which is the record
layout Flower's strategies expect. What the wrapped strategy sends needs no packing: sites read
per-tensor records as well as packed ones.

The project's own round loop (`server.federation`) does not use a Flower Strategy: it streams replies
into modality-aware averages, validates them and runs SecAgg+; a wrapped stock strategy gets none of
that, nor per-modality weighting (every array is weighted by the reply's `num-examples`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.protocol.records import MANIFEST_KEY, record_to_numpy


def unpacked_record(record: ArrayRecord) -> ArrayRecord:
    """`record` with one `Array` per tensor (a record that is not packed comes back as it is)."""
    if MANIFEST_KEY not in record:
        return record
    return ArrayRecord({key: Array(array.copy()) for key, array in record_to_numpy(record).items()})


def unpacked_content(content: RecordDict) -> RecordDict:
    """A copy of `content` whose ArrayRecords are unpacked; other records are shared, not copied."""
    return RecordDict({name: unpacked_record(record) if isinstance(record, ArrayRecord) else record
                       for name, record in content.items()})


class PackedRecordsStrategy(Strategy):
    """Runs a stock Flower strategy on replies whose ArrayRecords are packed (see the module doc)."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, [_unpacked_reply(m) for m in replies])

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, [_unpacked_reply(m) for m in replies])

    def summary(self) -> None:
        self.strategy.summary()


def _unpacked_reply(message: Message) -> Message:
    """A copy of the reply (same metadata) with its content unpacked; an error reply comes back as it is."""
    if not message.has_content():
        return message
    reply = copy.copy(message)  # shares the metadata; the content is rebound on the copy only
    reply.content = unpacked_content(message.content)
    return reply
