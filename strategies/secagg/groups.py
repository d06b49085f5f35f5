"""Modality-aware secure aggregation: one independent SecAgg+ instance per modality group.

Each modality's encoder is summed securely over the sites that hold it, with its own neighbour
graph, threshold and dropout handling. Independent instances (rather than one vector with masks
restricted to holders) keep the guarantee simple: a modality is revealed only as a sum over at least
`threshold` of its own holders, and a modality that loses too many sites aborts alone while the
others finish. The cost is one key exchange per modality a site holds, which is tiny next to masking.

Messages are nested one level: node -> group -> payload. Put each group's payload in its own record
(e.g. `ConfigRecord` "secagg.<group>" plus `ArrayRecord` "secagg.<group>" via `split_payload`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from strategies.fedavg import split_by_modality
from strategies.secagg.client import SecAggClient
from strategies.secagg.errors import SecAggAbort, SecAggProtocolError
from strategies.secagg.params import Payload, SecAggParams
from strategies.secagg.server import SecAggResult, SecAggServer

logger = logging.getLogger(__name__)

R = TypeVar("R")
NodeMessages = dict[int, dict[str, Payload]]
_STATE_SEPARATOR = "::"


def _by_node(per_group: Mapping[str, Mapping[int, Payload]]) -> NodeMessages:
    out: NodeMessages = {}
    for group, messages in per_group.items():
        for node, payload in messages.items():
            out.setdefault(node, {})[group] = payload
    return out


def _for_group(replies: Mapping[int, Mapping[str, Mapping[str, Any]]], group: str) -> dict[int, Mapping[str, Any]]:
    return {node: groups[group] for node, groups in replies.items() if group in groups}


@dataclass(frozen=True)
class ModalitySecAggResult:
    """Per-modality results, and the modalities whose secure sum was abandoned this round."""

    results: dict[str, SecAggResult]
    aborted: dict[str, SecAggAbort]

    def mean(self) -> dict[str, np.ndarray]:
        """All finished modalities' means in one flat dict (keys keep their modality prefix)."""
        merged: dict[str, np.ndarray] = {}
        for result in self.results.values():
            merged.update(result.mean)
        return merged


class ModalitySecAggServer:
    """Runs one `SecAggServer` per modality over that modality's holders (Flower node ids)."""

    def __init__(
        self,
        holders: Mapping[str, Sequence[int]],
        global_arrays: Mapping[str, np.ndarray],
        params: SecAggParams,
        workers: int | None = None,
    ) -> None:
        by_modality = split_by_modality(global_arrays)
        self.servers: dict[str, SecAggServer] = {}
        self.aborted: dict[str, SecAggAbort] = {}
        for modality, nodes in holders.items():
            if modality not in by_modality:
                raise KeyError(f"the global model has no arrays for modality {modality!r}")
            try:
                self.servers[modality] = SecAggServer.for_arrays(
                    modality, nodes, params, by_modality[modality], workers
                )
            except SecAggAbort as abort:
                self._abort(abort)

    def _abort(self, abort: SecAggAbort) -> None:
        logger.warning("%s", abort)
        self.aborted[abort.group] = abort
        self.servers.pop(abort.group, None)

    def _each(self, call: Callable[[str, SecAggServer], R]) -> dict[str, R]:
        out: dict[str, R] = {}
        for group, server in list(self.servers.items()):
            try:
                out[group] = call(group, server)
            except SecAggAbort as abort:
                self._abort(abort)
        return out

    def setup(self) -> NodeMessages:
        """Stage 0 messages, node -> group -> payload."""
        return _by_node(self._each(lambda group, server: server.setup()))

    def broadcast_keys(self, replies: Mapping[int, Mapping[str, Mapping[str, Any]]]) -> NodeMessages:
        """Stage 1 replies in, stage 2 messages out."""
        return _by_node(self._each(lambda group, server: server.broadcast_keys(_for_group(replies, group))))

    def relay_shares(self, replies: Mapping[int, Mapping[str, Mapping[str, Any]]]) -> NodeMessages:
        """Stage 3 replies in, relayed ciphertexts out."""
        return _by_node(self._each(lambda group, server: server.relay_shares(_for_group(replies, group))))

    def receive_masked(self, node_id: int, reply: Mapping[str, Mapping[str, Any]]) -> None:
        """Stage 4, one node's reply at a time (each group folds it into its running sum)."""
        for group, payload in reply.items():
            if group in self.servers:
                self.servers[group].receive_masked(node_id, payload)

    def request_unmask(self) -> NodeMessages:
        """Stage 5 requests."""
        return _by_node(self._each(lambda group, server: server.request_unmask()))

    def finish(self, replies: Mapping[int, Mapping[str, Mapping[str, Any]]]) -> ModalitySecAggResult:
        """Stage 5 replies in; the per-modality results and the aborted modalities out."""
        results = self._each(lambda group, server: server.finish(_for_group(replies, group)))
        return ModalitySecAggResult(results, dict(self.aborted))


@dataclass
class ModalitySecAggClient:
    """A site's side: one `SecAggClient` per modality group the server addressed to it.

    A group whose stage fails on this site (abort or malformed message) is logged and left
    unanswered, which the server treats as this site dropping out of that group only.
    """

    clients: dict[str, SecAggClient] = field(default_factory=dict)
    workers: int = 1  # threads for masking sweeps (local, not persisted)

    def _each(
        self,
        messages: Mapping[str, Mapping[str, Any]],
        call: Callable[[SecAggClient, Mapping[str, Any], str], Payload],
    ) -> dict[str, Payload]:
        out: dict[str, Payload] = {}
        for group, payload in messages.items():
            client = self.clients.get(group)
            if client is None:
                logger.warning("secagg: message for group %s, which this site has not set up", group)
                continue
            try:
                out[group] = call(client, payload, group)
            except (SecAggAbort, SecAggProtocolError) as error:
                logger.warning("secagg: leaving group %s this round: %s", group, error)
                del self.clients[group]
        return out

    def setup(self, messages: Mapping[str, Mapping[str, Any]]) -> dict[str, Payload]:
        """Stage 0 -> 1 for every group in `messages`."""
        self.clients = {group: SecAggClient(workers=self.workers) for group in messages}
        return self._each(messages, lambda client, payload, group: client.setup(payload))

    def share_keys(self, messages: Mapping[str, Mapping[str, Any]]) -> dict[str, Payload]:
        """Stage 2 -> 3."""
        return self._each(messages, lambda client, payload, group: client.share_keys(payload))

    def masked_input(
        self,
        messages: Mapping[str, Mapping[str, Any]],
        values: Mapping[str, np.ndarray],
        weights: Mapping[str, int],
        tallies: Mapping[str, Mapping[str, int]] | None = None,
    ) -> dict[str, Payload]:
        """Stage 3 -> 4: `values` is the site's flat dict (all modalities), `weights` per modality."""
        by_modality = split_by_modality(values)
        return self._each(
            messages,
            lambda client, payload, group: client.masked_input(
                payload, by_modality.get(group, {}), weights[group], (tallies or {}).get(group)
            ),
        )

    def unmask(self, messages: Mapping[str, Mapping[str, Any]]) -> dict[str, Payload]:
        """Stage 5."""
        return self._each(messages, lambda client, payload, group: client.unmask(payload))

    def to_state(self) -> dict[str, Any]:
        """Flat snapshot of every group's client for `context.state` (keys "<group>::<field>")."""
        state: dict[str, Any] = {}
        for group, client in self.clients.items():
            state.update({f"{group}{_STATE_SEPARATOR}{k}": v for k, v in client.to_state().items()})
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any], workers: int = 1) -> ModalitySecAggClient:
        """Rebuild from `to_state()`."""
        grouped: dict[str, dict[str, Any]] = {}
        for key, value in state.items():
            group, _, name = key.partition(_STATE_SEPARATOR)
            grouped.setdefault(group, {})[name] = value
        clients = {group: SecAggClient.from_state(fields) for group, fields in grouped.items()}
        for client in clients.values():
            client.workers = workers
        return cls(clients, workers)
