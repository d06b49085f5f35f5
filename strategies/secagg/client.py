"""The site's side of one group's secure sum (SecAgg+), as a state machine with one method per stage.

    setup(stage 0 config)             -> public keys                 (stage 1)
    share_keys(neighbours' keys)      -> encrypted shares per dest   (stage 3)
    masked_input(relayed shares, ...) -> masked uint32 vector        (stage 4)
    unmask(survivors, dropped)        -> shares of seeds / keys      (stage 5)

Flower's SuperNode starts a fresh process per message, so the state round-trips through
`to_state()` / `from_state()` (a flat ConfigRecord-ready dict to keep in `context.state`). The
self-mask seed and the mask private key are dropped from the state once the masked vector is sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from strategies.secagg import crypto
from strategies.secagg.errors import SecAggAbort, SecAggProtocolError
from strategies.secagg.masking import default_workers, masked_site_vector, stream_key
from strategies.secagg.params import GroupConfig, Payload, PayloadReader

STAGES = ("new", "setup", "share_keys", "masked_input", "unmask")
_CONFIG_PREFIX = "config."


def pair_context(group: str) -> bytes:
    """Key-derivation context of pairwise masks in `group` (kept apart from self masks)."""
    return b"visionfm-secagg/pair-mask/" + group.encode()


def self_context(group: str) -> bytes:
    """Key-derivation context of self masks in `group`."""
    return b"visionfm-secagg/self-mask/" + group.encode()


@dataclass
class SecAggClient:
    """One site in one group's secure sum. Create it empty, then call the stage methods in order."""

    stage: str = "new"
    config: GroupConfig | None = None
    index: int = -1
    encrypt_key: bytes = b""
    mask_key: bytes = b""
    seed: bytes = b""
    neighbours: list[int] = field(default_factory=list)
    public_encrypt: list[bytes] = field(default_factory=list)
    public_mask: list[bytes] = field(default_factory=list)
    share_sources: list[int] = field(default_factory=list)
    seed_shares: list[bytes] = field(default_factory=list)
    key_shares: list[bytes] = field(default_factory=list)
    workers: int = field(default_factory=default_workers)  # threads for masking; local, not persisted

    # ---- stages -------------------------------------------------------------------------------

    def setup(self, payload: Mapping[str, Any]) -> Payload:
        """Stage 0 -> 1: take the group configuration and this site's index, answer two public keys."""
        self._expect("new", "setup")
        self.config = GroupConfig.from_payload(payload, "setup")
        reader = PayloadReader(payload, self.config.group, "setup")
        self.index = reader.get("index", int)
        if not 0 <= self.index < self.config.num_clients:
            raise reader.fail("index", f"must lie in [0, {self.config.num_clients})")
        self.encrypt_key, public_encrypt = crypto.new_key_pair()
        self.mask_key, public_mask = crypto.new_key_pair()
        self.stage = "setup"
        return {"pk_encrypt": public_encrypt, "pk_mask": public_mask}

    def share_keys(self, payload: Mapping[str, Any]) -> Payload:
        """Stage 2 -> 3: check the neighbours' keys, Shamir-share our seed and mask key among them."""
        config = self._expect("setup", "share_keys")
        reader = PayloadReader(payload, config.group, "share_keys")
        neighbours = reader.index_list("neighbours", config.num_clients)
        public_encrypt = reader.list_of("pk_encrypt", bytes)
        public_mask = reader.list_of("pk_mask", bytes)
        if not len(neighbours) == len(public_encrypt) == len(public_mask):
            raise reader.fail("neighbours", "neighbours and their keys differ in length")
        if self.index not in neighbours:
            raise reader.fail("neighbours", "this site is missing from its own neighbourhood")
        position = neighbours.index(self.index)
        if (public_encrypt[position], public_mask[position]) != (
            crypto.public_key_of(self.encrypt_key),
            crypto.public_key_of(self.mask_key),
        ):
            raise reader.fail("pk_mask", "the keys listed for this site are not its own")
        if len(set(public_encrypt) | set(public_mask)) != 2 * len(neighbours):
            raise reader.fail("pk_mask", "public keys repeat")
        if len(neighbours) < config.threshold:
            raise SecAggAbort(config.group, "share_keys", config.threshold, len(neighbours), "neighbourhood")
        self.neighbours, self.public_encrypt, self.public_mask = neighbours, public_encrypt, public_mask

        self.seed = crypto.new_seed()
        seed_shares = crypto.split_secret(self.seed, config.threshold, len(neighbours))
        key_shares = crypto.split_secret(self.mask_key, config.threshold, len(neighbours))
        destinations: list[int] = []
        ciphertexts: list[bytes] = []
        for slot, neighbour in enumerate(neighbours):
            if neighbour == self.index:
                self._keep_share(self.index, seed_shares[slot], key_shares[slot])
                continue
            channel = crypto.shared_key(self.encrypt_key, public_encrypt[slot])
            destinations.append(neighbour)
            ciphertexts.append(
                crypto.encrypt_shares(channel, self.index, neighbour, seed_shares[slot], key_shares[slot])
            )
        self.stage = "share_keys"
        return {"destinations": destinations, "ciphertexts": ciphertexts}

    def masked_input(
        self,
        payload: Mapping[str, Any],
        values: Mapping[str, np.ndarray],
        weight: int,
        tallies: Mapping[str, int] | None = None,
    ) -> Payload:
        """Stage 3 -> 4: store the shares relayed to us, then send our masked, quantised vector.

        `values` holds the group's arrays (float32, finite; deltas from the global model are best),
        `weight` the site's example count (0 <= weight <= max_weight), `tallies` one non-negative int
        per configured tally name. Masks pair with every neighbour whose shares reached us.
        """
        config = self._expect("share_keys", "masked_input")
        reader = PayloadReader(payload, config.group, "masked_input")
        sources = reader.index_list("sources", config.num_clients)
        ciphertexts = reader.list_of("ciphertexts", bytes)
        if len(sources) != len(ciphertexts):
            raise reader.fail("ciphertexts", "sources and ciphertexts differ in length")
        for source, ciphertext in zip(sources, ciphertexts, strict=True):
            self._receive_share(reader, source, ciphertext)
        if len(sources) + 1 < config.threshold:
            raise SecAggAbort(config.group, "masked_input", config.threshold, len(sources) + 1, "shares received")
        factor, ordered_tallies = self._check_inputs(values, weight, dict(tallies or {}))
        adding = [stream_key(self.seed, config, self_context(config.group))]
        subtracting: list[bytes] = []
        for source in sources:
            slot = self.neighbours.index(source)
            secret = crypto.shared_key(self.mask_key, self.public_mask[slot])
            # The lower index adds the pair's mask and the higher one subtracts it, so they cancel.
            (adding if self.index < source else subtracting).append(
                stream_key(secret, config, pair_context(config.group))
            )
        try:
            vector = masked_site_vector(
                config, values, factor, weight, ordered_tallies, adding, subtracting, self.workers
            )
        except ValueError as error:  # a NaN or Inf, found while quantising: nothing has been sent
            raise ValueError(f"secure aggregation of '{config.group}': {error}") from None
        # Neither secret is needed any more: our neighbours hold shares of both.
        self.seed, self.mask_key = b"", b""
        self.stage = "masked_input"
        return {"masked": vector}

    def unmask(self, payload: Mapping[str, Any]) -> Payload:
        """Stage 5: reveal seed shares of surviving neighbours and mask-key shares of dropped ones."""
        config = self._expect("masked_input", "unmask")
        reader = PayloadReader(payload, config.group, "unmask")
        survivors = reader.index_list("survivors", config.num_clients)
        dropped = reader.index_list("dropped", config.num_clients)
        total_survivors = reader.get("num_survivors", int)
        if set(survivors) & set(dropped):
            raise reader.fail("dropped", "a site cannot both survive and drop out")
        if self.index not in survivors:
            raise reader.fail("survivors", "this site is missing from the survivors")
        unknown = (set(survivors) | set(dropped)) - set(self.share_sources)
        if unknown:
            raise reader.fail("survivors", f"no shares held for site index {min(unknown)}")
        if total_survivors < config.threshold or total_survivors < len(survivors):
            raise SecAggAbort(config.group, "unmask", config.threshold, total_survivors, "survivors")
        slots = {source: slot for slot, source in enumerate(self.share_sources)}
        self.stage = "unmask"
        return {
            "seed_owners": survivors,
            "seed_shares": [self.seed_shares[slots[j]] for j in survivors],
            "key_owners": dropped,
            "key_shares": [self.key_shares[slots[j]] for j in dropped],
        }

    # ---- helpers ------------------------------------------------------------------------------

    def _expect(self, stage: str, method: str) -> GroupConfig:
        group = self.config.group if self.config else "?"
        if self.stage != stage:
            raise SecAggProtocolError(group, method, "stage", f"called in state '{self.stage}', expected '{stage}'")
        if stage != "new" and self.config is None:
            raise SecAggProtocolError(group, method, "stage", "no configuration")
        return self.config  # type: ignore[return-value]

    def _keep_share(self, source: int, seed_share: bytes, key_share: bytes) -> None:
        self.share_sources.append(source)
        self.seed_shares.append(seed_share)
        self.key_shares.append(key_share)

    def _receive_share(self, reader: PayloadReader, source: int, ciphertext: bytes) -> None:
        if source == self.index or source not in self.neighbours:
            raise reader.fail("sources", f"site index {source} is not a neighbour")
        slot = self.neighbours.index(source)
        channel = crypto.shared_key(self.encrypt_key, self.public_encrypt[slot])
        try:
            sender, receiver, seed_share, key_share = crypto.decrypt_shares(channel, ciphertext)
        except Exception as error:  # Fernet raises InvalidToken; anything else is also a bad message
            raise reader.fail("ciphertexts", f"cannot decrypt the shares from site index {source}") from error
        if (sender, receiver) != (source, self.index):
            raise reader.fail("ciphertexts", f"shares from site index {source} were addressed elsewhere")
        self._keep_share(source, seed_share, key_share)

    def _check_inputs(
        self, values: Mapping[str, np.ndarray], weight: int, tallies: dict[str, int]
    ) -> tuple[float, list[int]]:
        """Check the update's layout, the weight and tallies; (scale factor, tallies in order).

        NaN and Inf are caught while the values are quantised (one pass over them, not two).
        """
        config = self.config
        assert config is not None
        _check_values(config, values)
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, np.integer))
            or not 0 <= weight <= config.max_weight
        ):
            raise ValueError(
                f"secure aggregation of '{config.group}': the site's weight must be an int in "
                f"[0, max_weight={config.max_weight}]; raise secagg.max_weight if it is larger"
            )
        if set(tallies) != set(config.tally_names):
            raise ValueError(f"tallies must be exactly {list(config.tally_names)}, got {sorted(tallies)}")
        cap = config.weight_cap_per_site
        for name, count in tallies.items():
            if not 0 <= int(count) <= cap:
                raise ValueError(f"tally {name!r} must lie in [0, {cap}]")
        return int(weight) / config.max_weight, [int(tallies[name]) for name in config.tally_names]

    # ---- persistence --------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """A flat, ConfigRecord-ready snapshot (private keys included: keep it on the site)."""
        state: dict[str, Any] = {
            "stage": self.stage,
            "index": self.index,
            "encrypt_key": self.encrypt_key,
            "mask_key": self.mask_key,
            "seed": self.seed,
            "neighbours": list(self.neighbours),
            "public_encrypt": list(self.public_encrypt),
            "public_mask": list(self.public_mask),
            "share_sources": list(self.share_sources),
            "seed_shares": list(self.seed_shares),
            "key_shares": list(self.key_shares),
        }
        if self.config is not None:
            state.update({_CONFIG_PREFIX + k: v for k, v in self.config.to_payload().items()})
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> SecAggClient:
        """Rebuild a client from `to_state()`."""
        config_fields = {k[len(_CONFIG_PREFIX) :]: v for k, v in state.items() if k.startswith(_CONFIG_PREFIX)}
        stage = str(state["stage"])
        if stage not in STAGES:
            raise SecAggProtocolError("?", "restore", "stage", f"unknown stage {stage!r}")
        return cls(
            stage=stage,
            config=GroupConfig.from_payload(config_fields, "restore") if config_fields else None,
            index=int(state["index"]),
            encrypt_key=bytes(state["encrypt_key"]),
            mask_key=bytes(state["mask_key"]),
            seed=bytes(state["seed"]),
            neighbours=[int(v) for v in state["neighbours"]],
            public_encrypt=[bytes(v) for v in state["public_encrypt"]],
            public_mask=[bytes(v) for v in state["public_mask"]],
            share_sources=[int(v) for v in state["share_sources"]],
            seed_shares=[bytes(v) for v in state["seed_shares"]],
            key_shares=[bytes(v) for v in state["key_shares"]],
        )


def _check_values(config: GroupConfig, values: Mapping[str, np.ndarray]) -> None:
    """The always-on update checks, done on the site because the server only sees masked data."""
    extra = sorted(set(values) - set(config.keys))
    if extra:
        raise KeyError(f"secure aggregation of '{config.group}': unknown key {extra[0]!r}")
    for key, size in zip(config.keys, config.sizes, strict=True):
        if key not in values:
            raise KeyError(f"secure aggregation of '{config.group}': missing key {key!r}")
        value = values[key]
        if not isinstance(value, np.ndarray) or value.dtype != np.float32 or value.size != size:
            raise ValueError(f"secure aggregation of '{config.group}': {key!r} must be float32 with {size} values")
