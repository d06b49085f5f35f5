"""The coordinator's side of one group's secure sum (SecAgg+), one method per stage.

    setup()                    -> stage 0 config per node
    broadcast_keys(replies)    -> stage 2 neighbours' public keys per node     (replies of stage 1)
    relay_shares(replies)      -> stage 3 ciphertexts addressed to each node   (replies of stage 3)
    receive_masked(node, msg)  -> folds one stage 4 vector into a running sum (or collect_masked)
    request_unmask()           -> stage 5 survivors / dropped per node
    finish(replies)            -> SecAggResult: the weighted mean and the tallies

Nodes are Flower node ids; inside the protocol a site is its index in `node_ids`. A node that does
not answer a stage, or answers malformed, is treated as dropped from then on. When fewer than the
threshold remain, the stage raises `SecAggAbort` naming itself and the counts. The server never
holds more than one masked vector besides its running uint32 sum.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from strategies.secagg import crypto
from strategies.secagg.client import pair_context, self_context
from strategies.secagg.errors import SecAggAbort, SecAggProtocolError
from strategies.secagg.masking import add_into, default_workers, stream_key, unmask_and_dequantise
from strategies.secagg.params import GroupConfig, Payload, PayloadReader, SecAggParams, ring_neighbourhood

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecAggResult:
    """What one group's secure sum revealed: the weighted mean and totals, never a single site's data."""

    group: str
    mean: dict[str, np.ndarray]
    total_weight: int
    clipped_values: int
    tallies: dict[str, int]
    survivors: list[int]
    dropped: list[int]


@dataclass
class _Round:
    active: set[int] = field(default_factory=set)  # indices still in the protocol
    public_encrypt: dict[int, bytes] = field(default_factory=dict)
    public_mask: dict[int, bytes] = field(default_factory=dict)
    neighbourhood: dict[int, list[int]] = field(default_factory=dict)
    sharers: set[int] = field(default_factory=set)  # U2: distributed their shares
    survivors: set[int] = field(default_factory=set)  # U3: sent a masked vector
    total: np.ndarray | None = None


class SecAggServer:
    """The server of one group: `node_ids` are the sites holding it, `shapes` its arrays' layout."""

    def __init__(
        self,
        group: str,
        node_ids: Sequence[int],
        params: SecAggParams,
        shapes: Mapping[str, tuple[int, ...]],
        workers: int | None = None,
    ) -> None:
        if len(set(node_ids)) != len(node_ids):
            raise ValueError("node ids repeat")
        keys = sorted(shapes)
        self.shapes = {key: tuple(shapes[key]) for key in keys}
        sizes = [int(np.prod(self.shapes[key], dtype=np.int64)) for key in keys]
        self.config: GroupConfig = params.resolve(group, len(node_ids), keys, sizes)
        self.node_ids = list(node_ids)
        self._index = {node: index for index, node in enumerate(self.node_ids)}
        self._round = _Round()
        self.stage = "new"
        self.workers = workers or default_workers()

    @classmethod
    def for_arrays(
        cls,
        group: str,
        node_ids: Sequence[int],
        params: SecAggParams,
        arrays: Mapping[str, np.ndarray],
        workers: int | None = None,
    ) -> SecAggServer:
        """A server for summing arrays shaped like `arrays` (e.g. one modality of the global model)."""
        return cls(group, node_ids, params, {key: np.shape(value) for key, value in arrays.items()}, workers)

    # ---- stages -------------------------------------------------------------------------------

    def setup(self) -> dict[int, Payload]:
        """Stage 0: the group configuration and each node's index."""
        self._advance("new", "setup")
        base = self.config.to_payload()
        self._round.active = set(range(len(self.node_ids)))
        return {node: {**base, "index": index} for node, index in self._index.items()}

    def broadcast_keys(self, replies: Mapping[int, Mapping[str, Any]]) -> dict[int, Payload]:
        """Stage 1 -> 2: collect public keys; send each node those of its ring neighbourhood."""
        self._advance("setup", "broadcast_keys")
        state = self._round
        seen: set[bytes] = set()
        for index, reply in self._answers("broadcast_keys", replies):
            reader = PayloadReader(reply, self.config.group, "broadcast_keys")
            try:
                keys = (reader.get("pk_encrypt", bytes), reader.get("pk_mask", bytes))
                for field_name, key in zip(("pk_encrypt", "pk_mask"), keys, strict=True):
                    try:
                        crypto.load_public_key(key)
                    except ValueError as problem:
                        raise reader.fail(field_name, str(problem)) from None
            except SecAggProtocolError as error:
                self._drop(index, error)
                continue
            if keys[0] in seen or keys[1] in seen or keys[0] == keys[1]:
                self._drop(index, reader.fail("pk_mask", "public key reused"))
                continue
            seen.update(keys)
            state.public_encrypt[index], state.public_mask[index] = keys
        state.active = set(state.public_mask)
        self._require(len(state.active), "public keys")
        out: dict[int, Payload] = {}
        for index in sorted(state.active):
            neighbours = ring_neighbourhood(sorted(state.active), index, self.config.num_shares)
            state.neighbourhood[index] = neighbours
            out[self.node_ids[index]] = {
                "neighbours": neighbours,
                "pk_encrypt": [state.public_encrypt[j] for j in neighbours],
                "pk_mask": [state.public_mask[j] for j in neighbours],
            }
        return out

    def relay_shares(self, replies: Mapping[int, Mapping[str, Any]]) -> dict[int, Payload]:
        """Stage 3: route every ciphertext to its destination among the nodes that shared."""
        self._advance("broadcast_keys", "relay_shares")
        state = self._round
        inbox: dict[int, dict[int, bytes]] = {}
        for index, reply in self._answers("relay_shares", replies):
            if index not in state.active:
                continue
            reader = PayloadReader(reply, self.config.group, "relay_shares")
            try:
                destinations = reader.index_list("destinations", len(self.node_ids))
                ciphertexts = reader.list_of("ciphertexts", bytes)
                expected = set(state.neighbourhood[index]) - {index}
                if set(destinations) != expected or len(ciphertexts) != len(destinations):
                    raise reader.fail("destinations", "must list every neighbour once, with a ciphertext each")
            except SecAggProtocolError as error:
                self._drop(index, error)
                continue
            for destination, ciphertext in zip(destinations, ciphertexts, strict=True):
                inbox.setdefault(destination, {})[index] = ciphertext
            state.sharers.add(index)
        self._require(len(state.sharers), "share keys")
        state.sharers = self._prune(state.sharers)
        state.active = set(state.sharers)
        self._require(len(state.active), "share keys", "sites whose secrets enough neighbours hold")
        out: dict[int, Payload] = {}
        for index in sorted(state.active):
            sources = [j for j in state.neighbourhood[index] if j != index and j in state.active]
            out[self.node_ids[index]] = {
                "sources": sources,
                "ciphertexts": [inbox[index][j] for j in sources],
            }
        return out

    def receive_masked(self, node_id: int, reply: Mapping[str, Any]) -> bool:
        """Stage 4, one node at a time: add its masked vector to the running sum; False if refused.

        The first accepted vector, when writable, becomes the running sum itself (no zeroed buffer
        to allocate and add into): the server owns the reply's array from then on.
        """
        if self.stage == "relay_shares":
            self.stage = "receive_masked"
        self._advance("receive_masked", "receive_masked", stay=True)
        state = self._round
        index = self._index.get(node_id)
        if index is None or index not in state.active or index in state.survivors:
            logger.warning("secagg %s: ignored a masked vector from node %s", self.config.group, node_id)
            return False
        reader = PayloadReader(reply, self.config.group, "receive_masked")
        try:
            vector = reader.array("masked", np.uint32, self.config.vector_length)
        except SecAggProtocolError as error:
            self._drop(index, error)
            return False
        if state.total is None:
            state.total = vector if vector.flags.writeable else vector.copy()
        else:
            add_into(state.total, vector, self.workers)  # wraps modulo 2**32, like the masks
        state.survivors.add(index)
        return True

    def collect_masked(self, replies: Mapping[int, Mapping[str, Any]]) -> None:
        """Stage 4 for a batch of replies."""
        for node_id, reply in replies.items():
            self.receive_masked(node_id, reply)

    def request_unmask(self) -> dict[int, Payload]:
        """Stage 5 request: tell each survivor which neighbours survived and which dropped out."""
        if self.stage == "relay_shares":  # nobody's vector arrived
            self.stage = "receive_masked"
        self._advance("receive_masked", "request_unmask")
        state = self._round
        self._require(len(state.survivors), "masked input")
        dropped = state.sharers - state.survivors
        for owner in sorted(state.survivors | dropped):
            holders = set(state.neighbourhood[owner]) & state.survivors
            if len(holders) < self.config.threshold:
                raise SecAggAbort(
                    self.config.group,
                    "masked input",
                    self.config.threshold,
                    len(holders),
                    f"surviving share holders of site index {owner}",
                )
        return {
            self.node_ids[index]: {
                "survivors": sorted(set(state.neighbourhood[index]) & state.survivors),
                "dropped": sorted(set(state.neighbourhood[index]) & dropped),
                "num_survivors": len(state.survivors),
            }
            for index in sorted(state.survivors)
        }

    def finish(self, replies: Mapping[int, Mapping[str, Any]]) -> SecAggResult:
        """Stage 5: rebuild survivors' seeds and dropped sites' mask keys, unmask, dequantise."""
        self._advance("request_unmask", "finish")
        state = self._round
        dropped = state.sharers - state.survivors
        seed_shares, key_shares = self._gather_shares(replies, dropped)
        seeds = {owner: self._rebuild(shares, owner, "seed") for owner, shares in seed_shares.items()}
        mask_keys = {owner: self._rebuild(shares, owner, "mask key") for owner, shares in key_shares.items()}
        for owner, scalar in mask_keys.items():
            if crypto.public_key_of(scalar) != state.public_mask[owner]:
                raise SecAggProtocolError(
                    self.config.group,
                    "finish",
                    "key_shares",
                    f"shares of site index {owner} rebuild a wrong key",
                )
        total = state.total
        assert total is not None
        adding, subtracting = self._unmasking_streams(seeds, mask_keys)
        header, flat = unmask_and_dequantise(
            self.config, total, adding, subtracting, len(state.survivors), self.workers
        )
        return self._result(header, flat, dropped)

    # ---- helpers ------------------------------------------------------------------------------

    def _advance(self, expected: str, method: str, stay: bool = False) -> None:
        if self.stage != expected:
            raise SecAggProtocolError(
                self.config.group, method, "stage", f"called in state '{self.stage}', expected '{expected}'"
            )
        if not stay:
            self.stage = method

    def _answers(self, stage: str, replies: Mapping[int, Mapping[str, Any]]) -> list[tuple[int, Mapping[str, Any]]]:
        answers = []
        for node_id, reply in replies.items():
            index = self._index.get(node_id)
            if index is None:
                logger.warning("secagg %s: ignored a %s reply from unknown node %s", self.config.group, stage, node_id)
                continue
            answers.append((index, reply))
        return answers

    def _drop(self, index: int, error: SecAggProtocolError) -> None:
        logger.warning("secagg %s: node %s dropped: %s", self.config.group, self.node_ids[index], error)

    def _require(self, remaining: int, stage: str, what: str = "sites remaining") -> None:
        if remaining < self.config.threshold:
            raise SecAggAbort(self.config.group, stage, self.config.threshold, remaining, what)

    def _prune(self, sharers: set[int]) -> set[int]:
        """Drop sharers whose secrets could never be rebuilt: fewer than t neighbours shared."""
        kept = set(sharers)
        changed = True
        while changed:
            weak = {i for i in kept if len(set(self._round.neighbourhood[i]) & kept) < self.config.threshold}
            kept -= weak
            changed = bool(weak)
        for index in sorted(sharers - kept):
            logger.warning(
                "secagg %s: node %s dropped: too few neighbours shared keys",
                self.config.group,
                self.node_ids[index],
            )
        return kept

    def _gather_shares(
        self, replies: Mapping[int, Mapping[str, Any]], dropped: set[int]
    ) -> tuple[dict[int, list[bytes]], dict[int, list[bytes]]]:
        state = self._round
        seed_shares: dict[int, list[bytes]] = {owner: [] for owner in state.survivors}
        key_shares: dict[int, list[bytes]] = {owner: [] for owner in dropped}
        for index, reply in self._answers("finish", replies):
            if index not in state.survivors:
                continue
            reader = PayloadReader(reply, self.config.group, "finish")
            try:
                seed_owners = reader.index_list("seed_owners", len(self.node_ids))
                seed_values = reader.list_of("seed_shares", bytes)
                key_owners = reader.index_list("key_owners", len(self.node_ids))
                key_values = reader.list_of("key_shares", bytes)
                held = set(state.neighbourhood[index])
                if (len(seed_owners), len(key_owners)) != (len(seed_values), len(key_values)) or not (
                    set(seed_owners) <= held & state.survivors and set(key_owners) <= held & dropped
                ):
                    raise reader.fail("seed_owners", "shares do not match the unmask request")
            except SecAggProtocolError as error:
                self._drop(index, error)
                continue
            for owner, share in zip(seed_owners, seed_values, strict=True):
                seed_shares[owner].append(share)
            for owner, share in zip(key_owners, key_values, strict=True):
                key_shares[owner].append(share)
        return seed_shares, key_shares

    def _rebuild(self, shares: list[bytes], owner: int, what: str) -> bytes:
        threshold = self.config.threshold
        if len(shares) < threshold:
            raise SecAggAbort(
                self.config.group,
                "unmask",
                threshold,
                len(shares),
                f"shares of the {what} of site index {owner}",
            )
        try:
            return crypto.join_secret(shares[:threshold])
        except ValueError as error:
            raise SecAggProtocolError(
                self.config.group, "finish", "shares", f"the {what} of site index {owner} does not rebuild"
            ) from error

    def _unmasking_streams(
        self, seeds: dict[int, bytes], mask_keys: dict[int, bytes]
    ) -> tuple[list[bytes], list[bytes]]:
        """Stream keys that cancel what is left in the sum: survivors' self masks, dropped sites' pairs."""
        config = self.config
        state = self._round
        adding: list[bytes] = []
        subtracting = [stream_key(seed, config, self_context(config.group)) for seed in seeds.values()]
        for owner, scalar in mask_keys.items():
            for partner in sorted(set(state.neighbourhood[owner]) & state.survivors):
                secret = crypto.shared_key(scalar, state.public_mask[partner])
                key = stream_key(secret, config, pair_context(config.group))
                # The survivor added this pair's mask if its index is lower; undo what it did.
                (subtracting if partner < owner else adding).append(key)
        return adding, subtracting

    def _result(self, header: np.ndarray, flat: np.ndarray, dropped: set[int]) -> SecAggResult:
        config = self.config
        state = self._round
        weight = int(header[0])
        if weight == 0:
            raise SecAggAbort(config.group, "unmask", 1, 0, "total weight of the survivors")
        mean: dict[str, np.ndarray] = {}
        offset = 0
        for key, size in zip(config.keys, config.sizes, strict=True):
            mean[key] = flat[offset : offset + size].reshape(self.shapes[key])
            offset += size
        return SecAggResult(
            group=config.group,
            mean=mean,
            total_weight=weight,
            clipped_values=int(header[1]),
            tallies={name: int(header[2 + i]) for i, name in enumerate(config.tally_names)},
            survivors=[self.node_ids[i] for i in sorted(state.survivors)],
            dropped=[self.node_ids[i] for i in sorted(dropped)],
        )
