"""The coordinator's round loop over a Flower Grid: send the global encoders, fold replies into a
running per-modality average as they arrive, checkpoint, evaluate, report.

Resume: when the run folder already holds complete round checkpoints, the loop restarts after the last
one with that round's global model, and metrics of later (unfinished) rounds are dropped, so nothing
is aggregated or counted twice.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from server.federation.checkpoints import latest_round, load_round, save_encoders, save_round
from server.federation.progress import RoundProgress
from server.federation.report import MetricsLog, plot_metrics, write_report
from server.federation.sampling import ExchangeOutcome, StragglerLedger, exchange_deadline, sample_sites
from server.federation.timing import round_timing
from strategies.central_dp import SiteLevelAccountant, add_noise_to_means
from strategies.compression import TrafficMeter, decode
from strategies.fedavg import ModalityAccumulator, SiteReply, split_by_modality
from strategies.protocol.records import MalformedRecordError, arrays_to_record, record_to_numpy
from strategies.protocol.secagg_stages import STAGE_KEY, pack_groups, unpack_groups
from strategies.reply_checks import (
    ReplayGuard,
    ReplyProblemError,
    check_freshness,
    checked_count,
    first_non_finite,
    model_digest,
    screen_update_norms,
    update_norms,
)
from strategies.robust import (
    Aggregator,
    aggregate_per_modality,
    bound_update_norms,
    coordinate_median,
    krum,
    trimmed_mean,
)
from strategies.secagg import ModalitySecAggServer, SecAggParams
from strategies.secure_noise import SecureGaussian
from strategies.validation import validate_reply
from visionfm_core.errors import ConfigError
from visionfm_core.memory import process_memory_mb
from visionfm_core.pretraining import encoder_spec
from visionfm_core.run_config import RunConfig

logger = logging.getLogger(__name__)

CentralEvaluator = Callable[[dict[str, np.ndarray]], dict[str, dict[str, float]]]
# What a reply says about itself (client/app.py writes it): the round and the global model it answers.
REPLY_INFO = "reply"
ROUND_KEY = "server-round"
DIGEST_KEY = "model-digest"
FAILURE_FILE = "failure.json"


class FederationFailedError(RuntimeError):
    """The run cannot go on (its global model is no longer finite, or no site's update has been accepted
    for `max-failed-rounds` rounds); the last good checkpoint is kept and `--resume` continues from it."""


@dataclass
class ReplyParts:
    """The pieces of one site's training reply."""

    metrics: dict[str, Any]
    per_modality: dict[str, dict[str, float]]
    counts: dict[str, int]
    arrays: dict[str, np.ndarray]


@dataclass
class FederationResult:
    """What a finished run produced."""

    out_dir: Path
    rounds_completed: int
    arrays: dict[str, np.ndarray]
    metrics: MetricsLog
    rejected: list[str] = field(default_factory=list)


def _site_label(msg: Message, names: dict[int, str], site_names: list[str],
                destinations: dict[str, int] | None = None) -> str:
    """The site a reply belongs to. `destinations` (message id -> node it was sent to) wins over the
    reply's sender: an error the SuperLink makes itself (e.g. node unavailable) carries the SuperLink's
    own id as sender, and would otherwise show up as a new, phantom site."""
    node = (destinations or {}).get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
    if node not in names:
        metrics: dict[str, Any] = dict(msg.content.metric_records.get("metrics", {})) if msg.has_content() else {}
        index = metrics.get("site-index")
        if isinstance(index, (int, float)) and 0 <= int(index) < len(site_names):
            names[node] = site_names[int(index)]
        else:
            names[node] = f"site-{len(names) + 1}"
    return names[node]


def _modality_metrics(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    grouped: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if "/" in key and isinstance(value, (int, float)):
            modality, name = key.split("/", 1)
            grouped.setdefault(modality, {})[name] = float(value)
    return grouped


def robust_aggregator(cfg: RunConfig) -> Aggregator:
    """The per-modality aggregation rule a robust strategy names."""
    if cfg.strategy == "median":
        return coordinate_median
    if cfg.strategy == "trimmed-mean":
        return lambda updates: trimmed_mean(updates, cfg.trim_beta)
    if cfg.strategy == "krum":
        return lambda updates: krum(updates, cfg.byzantine, 1)
    # Multi-Krum: average the n - f best-scored updates.
    return lambda updates: krum(updates, cfg.byzantine, len(updates) - cfg.byzantine)


class Federation:
    """Runs `cfg.num_rounds` rounds of federated SSL pretraining on a Grid."""

    def __init__(self, grid: Grid, cfg: RunConfig, initial_arrays: dict[str, np.ndarray],
                 central_evaluator: CentralEvaluator | None = None, site_names: Iterable[str] = (),
                 poll_interval: float = 0.05) -> None:
        self.grid = grid
        self.cfg = cfg
        self.out_dir = Path(cfg.out_dir)
        self.arrays = dict(initial_arrays)
        self.central_evaluator = central_evaluator
        self.site_names = list(site_names)
        self.node_names: dict[int, str] = {}
        self.poll_interval = poll_interval
        self.metrics = MetricsLog(self.out_dir)
        self.rejected: list[str] = []
        self.accepted: list[str] = []
        self.traffic = TrafficMeter()
        # Noise must be unpredictable to the sites: a CSPRNG keyed from the OS, never the run seed.
        self.dp_rng = SecureGaussian()
        self.central_accountant = SiteLevelAccountant(max(cfg.central_dp_noise, 1e-6))
        self.progress = RoundProgress(cfg.num_rounds, enabled=cfg.progress)
        self.site_seconds: dict[str, float] = {}  # this round: site -> its reported local compute time
        self.destinations: dict[str, int] = {}  # message id -> the node it was sent to
        self.last_nodes: set[int] = set()  # the nodes the previous exchange went to
        self.global_digest = ""  # digest of the global model the current exchange sent
        self.replays = ReplayGuard()
        self.failed_rounds = 0  # rounds in a row without an accepted update
        self._said_dp_evaluation = False
        self.stragglers = StragglerLedger()  # messages whose late replies are dropped unread

    # -- messaging ---------------------------------------------------------------------------------
    def _wait_for_nodes(self) -> list[int]:
        """The connected sites, once at least `min-sites` are; a site sent the previous exchange that has
        dropped out (restarting after a crash) gets up to `rejoin-grace` seconds to reconnect first."""
        start = time.monotonic()
        deadline = start + self.cfg.round_timeout
        announced = False
        while True:
            nodes = sorted(self.grid.get_node_ids())
            missing = self.last_nodes.difference(nodes)
            if len(nodes) >= self.cfg.min_sites:
                if not missing or time.monotonic() - start >= self.cfg.rejoin_grace:
                    if missing:
                        logger.warning("going on without %d site(s) of the last round: not back within %.0fs",
                                       len(missing), self.cfg.rejoin_grace)
                    self.last_nodes = set(nodes)
                    return nodes
                if not announced:
                    logger.info("waiting up to %.0fs for %d site(s) of the last round to reconnect",
                                self.cfg.rejoin_grace, len(missing))
                    announced = True
            elif time.monotonic() > deadline:
                raise TimeoutError(f"only {len(nodes)} of the required {self.cfg.min_sites} sites connected")
            time.sleep(1.0)

    def _exchange(self, message_type: str, server_round: int, on_reply: Callable[[Message], None]) -> int:
        """Send the global model to this round's sample of the connected sites (`fraction-train` /
        `fraction-evaluate`, at least `min-sites`); call `on_reply` for each reply as it arrives (streaming:
        replies are folded in and dropped, never all held at once). Returns replies seen; the sample and
        its stragglers go to the metrics as a `sampling-<phase>` row."""
        connected = self._wait_for_nodes()
        phase = "evaluate" if message_type == MessageType.EVALUATE else "train"
        fraction = self.cfg.fraction_evaluate if phase == "evaluate" else self.cfg.fraction_train
        nodes = sample_sites(connected, fraction, self.cfg.min_sites, self.cfg.seed, server_round, phase)
        outcome = ExchangeOutcome(connected=len(connected), sampled=len(nodes))
        if message_type == MessageType.TRAIN:  # what a training reply must name (evaluation sends no update)
            self.global_digest = model_digest(self.arrays)
        config = ConfigRecord({**self.cfg.to_flat(), ROUND_KEY: server_round, DIGEST_KEY: self.global_digest})
        record = arrays_to_record(self.arrays)
        messages = [
            Message(RecordDict({"arrays": record, "config": config}), dst_node_id=node,
                    message_type=message_type, group_id=str(server_round))
            for node in nodes
        ]
        seen = self._send(messages, server_round, message_type, on_reply, outcome)
        self.metrics.add(server_round, "server", "all", f"sampling-{phase}",
                         {**outcome.as_metrics(), "fraction": fraction, "seed": self.cfg.seed})
        return seen

    def _send(self, messages: list[Message], server_round: int, label: str,
              on_reply: Callable[[Message], None], outcome: ExchangeOutcome | None = None) -> int:
        """Push messages and hand each reply to `on_reply` as it arrives, until all answered or the round
        deadline (`round-deadline`, else `round-timeout`) passes; the silent ones become stragglers whose
        late replies are dropped unread when they come."""
        outcome = outcome if outcome is not None else ExchangeOutcome(sampled=len(messages))
        ids = list(self.grid.push_messages(messages))
        self.destinations.update(zip(ids, (m.metadata.dst_node_id for m in messages), strict=False))
        pending = set(ids)
        deadline = exchange_deadline(time.monotonic(), self.cfg.round_timeout, self.cfg.round_deadline)
        while pending and time.monotonic() < deadline:
            for reply in self._pull(pending | self.stragglers.outstanding):
                reply_to = reply.metadata.reply_to_message_id
                if self.stragglers.forget([reply_to]):
                    outcome.late_dropped += 1  # an earlier exchange's straggler: too late to count
                    continue
                pending.discard(reply_to)
                outcome.replied += 1
                on_reply(reply)
            if pending:
                time.sleep(self.poll_interval)
        seen = outcome.replied
        if pending:
            outcome.stragglers += len(pending)
            self.stragglers.give_up(pending)
            waited = exchange_deadline(0.0, self.cfg.round_timeout, self.cfg.round_deadline)
            logger.warning("round %d %s: %d site(s) did not answer within %.0fs; going on with %d repl(ies)",
                           server_round, label, len(pending), waited, seen)
        for message_id in ids:  # replies of this exchange are all handled: their labels are not needed again
            self.destinations.pop(message_id, None)
        return seen

    def _pull(self, pending: set[str]) -> list[Message]:
        """The replies available now; none when the SuperLink has a passing fault (the caller polls again)."""
        try:
            return list(self.grid.pull_messages(pending))
        except (httpx.HTTPStatusError, httpx.TransportError) as exc:
            # Observed under load: Flower's SQLite store waits at most 5 s for its lock and answers 500.
            if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code < 500:
                raise
            logger.warning("pulling replies from the SuperLink failed (%s); polling again", type(exc).__name__)
            return []

    # -- phases ------------------------------------------------------------------------------------
    def train_round(self, server_round: int) -> bool:
        """One aggregation round; returns False (global model unchanged) when too few sites succeeded."""
        if self.cfg.secure_aggregation:
            return self._secure_train_round(server_round)
        robust = self.cfg.strategy != "fedavg"
        screened = self.cfg.update_norm_factor > 0
        accumulator = ModalityAccumulator()
        held: list[SiteReply] = []
        norms: list[dict[str, float]] = []

        def fold(reply: Message) -> None:
            site = _site_label(reply, self.node_names, self.site_names, self.destinations)
            update = self._site_update(server_round, site, reply)
            if update is None:
                return
            if screened:
                norms.append(update_norms(update, self.arrays))
            if self.cfg.max_update_norm > 0:
                update = self._bounded(update)
            if robust or screened:
                held.append(update)  # robust rules and the norm screen need every update at once
            else:
                accumulator.add(update)
            self.accepted.append(site)

        self.accepted = []
        self.progress.start_round(server_round)
        self._exchange(MessageType.TRAIN, server_round, fold)
        if screened and held:
            screen = screen_update_norms(held, norms, self.cfg.update_norm_factor)
            for site, reason in screen.rejected:
                self._reject(server_round, site, reason)
                self._forget_update(server_round, site)
            held = screen.kept
            if not robust:
                for update in held:
                    accumulator.add(update)
        if len(self.accepted) < self.cfg.min_sites:
            logger.error("round %d failed: %d accepted update(s), %d required; global model kept",
                         server_round, len(self.accepted), self.cfg.min_sites)
            return False
        previous = dict(self.arrays)
        if robust:
            self.arrays = aggregate_per_modality(held, robust_aggregator(self.cfg), self.arrays)
        else:
            self.arrays.update(accumulator.result())
        self._add_central_noise(server_round, previous, {m: len(s) for m, s in accumulator.contributors.items()})
        self._check_global_model(server_round, previous)
        logger.info("round %d aggregated (%s) from %s", server_round, self.cfg.strategy, ", ".join(self.accepted))
        return True

    def _row_round(self, server_round: int) -> int:
        """The metrics row number of a round of this phase."""
        return server_round

    def _forget_update(self, server_round: int, site: str) -> None:
        """Undo what accepting `site`'s update recorded (it was rejected once the whole round was seen)."""
        self.accepted.remove(site)
        self.site_seconds.pop(site, None)
        row_round = self._row_round(server_round)
        self.metrics.rows = [r for r in self.metrics.rows
                             if not (int(r["round"]) == row_round and r["site"] == site
                                     and r["phase"] in ("train", "finetune", "transport"))]

    def _check_global_model(self, server_round: int, previous: dict[str, np.ndarray]) -> None:
        """Stop the run when aggregation produced a non-finite model (the previous one is kept)."""
        bad = first_non_finite(self.arrays)
        if bad is not None:
            self.arrays = previous
            raise FederationFailedError(f"round {server_round}: the aggregated global model is not finite ({bad})")

    def _end_round(self, server_round: int, aggregated: bool) -> None:
        """Count rounds in a row that kept the global model (too few accepted updates); too many stop the
        run as failed: every site failing or rejected for rounds is not a run to report as completed."""
        self.failed_rounds = 0 if aggregated else self.failed_rounds + 1
        limit = self.cfg.max_failed_rounds
        if limit and self.failed_rounds >= limit:
            raise FederationFailedError(f"round {server_round}: {self.failed_rounds} round(s) in a row without enough "
                                        f"accepted updates to aggregate (max-failed-rounds = {limit})")

    def _record_failure(self, exc: FederationFailedError, last_good: int | None, label: str = "round") -> None:
        """Log why the run stops and leave `failure.json` beside its checkpoints."""
        kept = f"the last good checkpoint is {label} {last_good}" if last_good is not None else "no round was kept"
        message = f"run failed: {exc}; {kept}; fix the cause, then resume (visionfm-server run JOB --resume)"
        logger.error(message)
        payload = {"reason": str(exc), "last-good-round": last_good, "phase": self.cfg.phase,
                   "rejected": self.rejected[-20:]}
        (self.out_dir / FAILURE_FILE).write_text(json.dumps(payload, indent=2))

    def _read_reply(self, server_round: int, site: str, reply: Message) -> ReplyParts | None:
        """A training reply's metrics, per-modality numbers, checked example counts and arrays; None
        (logged) when the site answered with an error or the reply is malformed, stale or implausible."""
        if reply.has_error():
            self._reject(server_round, site, f"site error: {reply.error.reason}")
            return None
        try:
            metrics, per_modality, counts = self._reply_numbers(server_round, reply)
            if "arrays" not in reply.content.array_records:
                raise ReplyProblemError("reply holds no array record")
            arrays = record_to_numpy(reply.content.array_records["arrays"])
        except (ReplyProblemError, MalformedRecordError) as exc:
            self._reject(server_round, site, str(exc))
            return None
        except (KeyError, TypeError, ValueError) as exc:  # Flower could not deserialise a tampered record
            self._reject(server_round, site, f"unreadable reply ({type(exc).__name__})")
            return None
        return ReplyParts(metrics, per_modality, counts, arrays)

    def _reply_numbers(self, server_round: int,
                       reply: Message) -> tuple[dict[str, Any], dict[str, dict[str, float]], dict[str, int]]:
        """The reply's metrics, checked for freshness, with every example count checked."""
        content = reply.content
        if "metrics" not in content.metric_records:
            raise ReplyProblemError("reply holds no metrics")
        info = content.config_records.get(REPLY_INFO)
        info_values: dict[str, Any] = dict(info) if info is not None else {}
        check_freshness(info_values.get(ROUND_KEY), info_values.get(DIGEST_KEY), server_round, self.global_digest)
        metrics: dict[str, Any] = dict(content.metric_records["metrics"])
        per_modality = _modality_metrics(metrics)
        cap = self.cfg.max_site_examples
        counts = {m: checked_count(v.get("num-examples", 0), cap, f"{m}/num-examples") for m, v in per_modality.items()}
        for key in ("bytes-sent", "compute-seconds"):
            value = metrics.get(key, 0.0)
            if not isinstance(value, (int, float)) or not 0 <= float(value) < float("inf"):
                raise ReplyProblemError(f"metric {key} is not a finite number >= 0")
        return metrics, per_modality, counts

    def _budget_refusal(self, server_round: int, site: str, parts: ReplyParts) -> bool:
        """A site that refused the whole round because its privacy budget would be exceeded (DP-SGD) sends
        no arrays on purpose: its rows are recorded (`budget_exhausted`), it is not counted as rejected."""
        if parts.arrays or not parts.per_modality:
            return False
        if not all(values.get("budget-exhausted") for values in parts.per_modality.values()):
            return False
        for modality, values in parts.per_modality.items():
            self._record_train(server_round, site, modality, values)
        logger.info("round %d: %s trained nothing: its privacy budget is spent", server_round, site)
        return True

    def _site_update(self, server_round: int, site: str, reply: Message) -> SiteReply | None:
        """Decode, validate and record one site's training reply; None (logged) when it is rejected."""
        parts = self._read_reply(server_round, site, reply)
        if parts is None or self._budget_refusal(server_round, site, parts):
            return None
        metrics, per_modality, counts, arrays = parts.metrics, parts.per_modality, parts.counts, parts.arrays
        if self.cfg.compression != "none":
            try:
                delta = decode(arrays, self.cfg.compression)
            except (TypeError, ValueError, KeyError) as exc:
                self._reject(server_round, site, f"undecodable {self.cfg.compression} update: {exc}")
                return None
            arrays = {k: self.arrays[k] + v if k in self.arrays else v for k, v in delta.items()}
        if self.cfg.central_dp_clip > 0:
            # Central DP: every site counts once, whatever its size.
            counts = {m: min(c, 1) for m, c in counts.items()}
        update = SiteReply(site, arrays, counts)
        problem = validate_reply(update, self.arrays)
        if problem is not None:
            self._reject(server_round, site, str(problem))
            return None
        if not self._fresh_update(server_round, site, parts.arrays):
            return None
        update = self._central_dp_clipped(update)
        for modality, values in per_modality.items():
            self.metrics.add(server_round, site, modality, "train", values)
        self._note_compute(site, metrics)
        self._note_memory(server_round, site, metrics)
        sent_bytes = int(metrics.get("bytes-sent", 0))
        self.traffic.record(server_round, site, sent_bytes)
        self.metrics.add(server_round, site, "all", "transport", {"bytes_sent": sent_bytes})
        self.progress.site_done(site, float(np.mean([v.get("loss", np.nan) for v in per_modality.values()])))
        return update

    def _fresh_update(self, server_round: int, site: str, arrays: dict[str, np.ndarray]) -> bool:
        """False (logged) when these exact arrays were accepted in an earlier round: a replayed update."""
        if not arrays:
            return True
        update_digest = model_digest(arrays)
        unchanged = model_digest({k: self.arrays[k] for k in arrays if k in self.arrays})
        try:
            self.replays.check(site, update_digest, server_round, unchanged)
        except ReplyProblemError as exc:
            self._reject(server_round, site, str(exc))
            return False
        self.replays.remember(site, update_digest, server_round)
        return True

    def _note_compute(self, site: str, metrics: dict[str, Any]) -> None:
        if "compute-seconds" in metrics:
            self.site_seconds[site] = float(metrics["compute-seconds"])

    def _note_memory(self, server_round: int, site: str, metrics: dict[str, Any]) -> None:
        """A site's reported process memory (a simulated site: the Ray worker that ran it), as numbers only."""
        # A site's numbers are untrusted: only finite, non-negative values below 1 PB reach the report.
        values = {k: float(v) for k in ("rss-mb", "peak-rss-mb")
                  if isinstance(v := metrics.get(f"memory-{k}"), (int, float)) and not isinstance(v, bool)
                  and 0.0 <= float(v) < 1e9}
        if values:
            self.metrics.add(server_round, site, "all", "memory", values)

    def _add_central_noise(self, server_round: int, previous: dict[str, np.ndarray], sites: dict[str, int]) -> None:
        """Site-level DP: Gaussian noise (std z*C/n) on each modality's mean update; epsilon is accounted."""
        if self.cfg.central_dp_noise <= 0 or not sites:
            return
        means = {k: self.arrays[k] - previous[k] for k in self.arrays if k.split("/", 1)[0] in sites}
        noised = add_noise_to_means(means, sites, self.cfg.central_dp_noise, self.cfg.central_dp_clip, self.dp_rng)
        for key, value in noised.items():
            self.arrays[key] = (previous[key] + value).astype(np.float32)
        self.central_accountant.step()
        epsilon = self.central_accountant.epsilon(self.cfg.central_dp_delta)
        spent = {"epsilon": epsilon, "delta": self.cfg.central_dp_delta, "noise_multiplier": self.cfg.central_dp_noise}
        self.metrics.add(self._row_round(server_round), "server", "all", "central-dp", spent)
        logger.info("round %d: site-level DP noise added, epsilon %.3f", server_round, epsilon)

    def _central_dp_clipped(self, update: SiteReply) -> SiteReply:
        """Central DP: the whole update clipped to `central-dp-clip` again here, so the epsilon holds even
        for a site that did not clip (under secure aggregation the sites' own clipping is all there is)."""
        if self.cfg.central_dp_clip <= 0 or not update.arrays:
            return update
        ((clipped, _),) = bound_update_norms([(update.arrays, 1.0)], self.arrays, self.cfg.central_dp_clip)
        return SiteReply(update.site, dict(clipped), update.num_examples)

    def _bounded(self, update: SiteReply) -> SiteReply:
        bounded: dict[str, np.ndarray] = {}
        for arrays in split_by_modality(update.arrays).values():
            ((clipped, _),) = bound_update_norms([(arrays, 1.0)], self.arrays, self.cfg.max_update_norm)
            bounded.update(clipped)
        return SiteReply(update.site, bounded, update.num_examples)

    def _secure_train_round(self, server_round: int) -> bool:
        """Train, then SecAgg+ per modality: the server learns each modality's mean delta, no site's."""
        holders: dict[str, list[int]] = {}
        weights: list[int] = []
        reference = self._aggregated()
        shared_modalities = set(split_by_modality(reference))

        def record(reply: Message) -> None:
            site = _site_label(reply, self.node_names, self.site_names, self.destinations)
            if reply.has_error():
                self._reject(server_round, site, f"site error: {reply.error.reason}")
                return
            # Under SecAgg+ the server never sees a site's update, only what the reply says in the clear:
            # its round, model digest and example counts are checked here; its update is bounded at the
            # site (secagg-clip-range) and by the masking field, and the unmasked mean is checked finite.
            try:
                metrics, per_modality, counts = self._reply_numbers(server_round, reply)
            except (ReplyProblemError, KeyError, TypeError, ValueError) as exc:
                self._reject(server_round, site, str(exc))
                return
            self._note_compute(site, metrics)
            self._note_memory(server_round, site, metrics)
            for modality, values in per_modality.items():
                self._record_train(server_round, site, modality, values)
                count = counts[modality]
                if count > 0 and modality in shared_modalities:
                    holders.setdefault(modality, []).append(reply.metadata.src_node_id)
                    weights.append(count)
            self.progress.site_done(site, float(metrics.get(f"{self.cfg.modality_list[0]}/loss", np.nan)))

        self.progress.start_round(server_round)
        self._exchange(MessageType.TRAIN, server_round, record)
        if not holders:
            if not reference:  # nothing is shared (frozen encoder, personal heads): nothing to aggregate
                return True
            logger.error("round %d failed: no site trained", server_round)
            return False
        params = SecAggParams(threshold=self.cfg.secagg_threshold, clip_range=self.cfg.secagg_clip_range,
                              max_weight=1 if self.cfg.central_dp_clip > 0 else max(weights))
        protocol = ModalitySecAggServer(holders, reference, params)
        replies = self._query_stage(server_round, "setup", protocol.setup())
        replies = self._query_stage(server_round, "share-keys", protocol.broadcast_keys(replies))
        self._query_stage(server_round, "masked-input", protocol.relay_shares(replies), protocol.receive_masked)
        outcome = protocol.finish(self._query_stage(server_round, "unmask", protocol.request_unmask()))
        for modality, abort in outcome.aborted.items():
            self._reject(server_round, f"{modality} group", f"secure aggregation aborted: {abort}")
        previous = dict(self.arrays)
        for key, mean_delta in outcome.mean().items():
            # In place: the mean is a float32 view of the protocol's own buffer, so nothing is allocated.
            self.arrays[key] = np.add(mean_delta, self.arrays[key], out=mean_delta, casting="same_kind")
        self._add_central_noise(server_round, previous, {m: len(r.survivors) for m, r in outcome.results.items()})
        self._check_global_model(server_round, previous)
        logger.info("round %d securely aggregated: %s", server_round,
                    ", ".join(f"{m} over {len(r.survivors)} sites" for m, r in outcome.results.items()))
        return bool(outcome.results)

    def _aggregated(self) -> dict[str, np.ndarray]:
        """The part of the global model that sites train and send back (all of it when pretraining)."""
        return self.arrays

    def _record_train(self, server_round: int, site: str, modality: str, values: dict[str, float]) -> None:
        self.metrics.add(server_round, site, modality, "train", values)

    def _query_stage(self, server_round: int, stage: str, node_messages: dict[int, dict[str, Any]],
                     on_reply: Callable[[int, dict[str, Any]], None] | None = None) -> dict[int, dict[str, Any]]:
        """Send one SecAgg+ stage to the nodes it addresses; a node that fails or is silent has dropped."""
        messages = []
        for node, groups in node_messages.items():
            content = pack_groups(groups)
            content["config"] = ConfigRecord({STAGE_KEY: stage, "server-round": server_round})
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.QUERY,
                                    group_id=str(server_round)))
        replies: dict[int, dict[str, Any]] = {}

        def collect(reply: Message) -> None:
            if reply.has_error():
                logger.warning("round %d secagg %s: a site dropped out (%s)", server_round, stage, reply.error.reason)
                return
            groups = unpack_groups(reply.content)
            if on_reply is not None:
                on_reply(reply.metadata.src_node_id, groups)
            else:
                replies[reply.metadata.src_node_id] = groups

        self._send(messages, server_round, f"secagg {stage}", collect)
        return replies

    def _reject(self, server_round: int, site: str, reason: str) -> None:
        line = f"round {server_round}: update from {site} rejected: {reason}"
        logger.warning(line)
        self.rejected.append(line)

    def _federated_evaluation(self) -> bool:
        """Whether sites are asked to score the model: never under DP, where their scores would be
        un-noised statistics of their images; the coordinator's held-out data scores the run instead."""
        if self.cfg.dp and not self._said_dp_evaluation:
            logger.info("dp = true: sites score nothing; the model is evaluated on the coordinator's "
                        "held-out data only%s", "" if self.central_evaluator else " (none is configured)")
            self._said_dp_evaluation = True
        return not self.cfg.dp

    def evaluate(self, server_round: int) -> None:
        """Federated evaluation on each site's validation split, plus the server's central evaluation."""

        def record(reply: Message) -> None:
            site = _site_label(reply, self.node_names, self.site_names, self.destinations)
            if reply.has_error():
                logger.warning("round %d: evaluation failed at %s: %s", server_round, site, reply.error.reason)
                return
            for modality, values in _modality_metrics(dict(reply.content.metric_records["metrics"])).items():
                self.metrics.add(server_round, site, modality, "evaluate", values)

        if self._federated_evaluation():
            self._exchange(MessageType.EVALUATE, server_round, record)
        if self.central_evaluator is not None:
            for modality, values in self.central_evaluator(self.arrays).items():
                self.metrics.add(server_round, "global-test", modality, "evaluate", values)
                self.progress.score(modality, values.get("knn_accuracy", float("nan")))

    def _check_resumable(self) -> None:
        """Refuse to resume a folder whose model differs from this config (it would not load)."""
        saved_path = self.out_dir / "config.json"
        if not saved_path.is_file():
            return
        saved = json.loads(saved_path.read_text())
        for key in ("arch", "image-size", "patch-size", "modalities", "objective", "share-head"):
            if key in saved and saved[key] != self.cfg.to_flat()[key]:
                raise ConfigError(key, f"cannot resume {self.out_dir}: it was run with {saved[key]!r}, "
                                       f"this config has {self.cfg.to_flat()[key]!r}")

    # -- the run -----------------------------------------------------------------------------------
    def run(self) -> FederationResult:
        """Run (or resume) the federation and write checkpoints, metrics, plots and the report."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.cfg.resume:
            self._check_resumable()
        (self.out_dir / "config.json").write_text(json.dumps(self.cfg.to_flat(), indent=2, sort_keys=True))
        spec = encoder_spec(self.cfg)
        start = 1
        resumed = latest_round(self.out_dir) if self.cfg.resume else None
        if resumed is None and (self.out_dir / "checkpoints").exists():
            # A fresh run in a used folder: old rounds must not be mistaken for this run's.
            shutil.rmtree(self.out_dir / "checkpoints")
        if resumed is not None:
            self.arrays.update(load_round(self.out_dir, resumed))
            self.metrics.drop_after(resumed)
            start = resumed + 1
            if self.cfg.central_dp_noise > 0:  # the rounds before the crash released noised means too
                self.central_accountant.step(resumed)
            logger.info("resuming after round %d from %s", resumed, self.out_dir)
        else:
            self.metrics.rows = []
            self.evaluate(0)
            save_round(self.out_dir, 0, self.arrays, self.cfg.modality_list, spec, {"objective": self.cfg.objective})
            self.metrics.save()
        (self.out_dir / FAILURE_FILE).unlink(missing_ok=True)
        with self.progress:
            for server_round in range(start, self.cfg.num_rounds + 1):
                self.site_seconds = {}
                started = time.perf_counter()
                try:
                    self._end_round(server_round, self.train_round(server_round))
                except FederationFailedError as exc:
                    self._record_failure(exc, server_round - 1)
                    raise
                self.metrics.add(server_round, "server", "all", "timing",
                                 round_timing(time.perf_counter() - started, self.site_seconds))
                self.metrics.add(server_round, "coordinator", "all", "memory", process_memory_mb())
                if server_round % self.cfg.eval_every == 0 or server_round == self.cfg.num_rounds:
                    self.evaluate(server_round)
                # Metrics first, then the checkpoint marker: a crash in between re-runs this round on
                # resume and drops its rows, so nothing is counted twice.
                self.metrics.save()
                save_round(self.out_dir, server_round, self.arrays, self.cfg.modality_list, spec,
                           {"objective": self.cfg.objective})
        save_encoders(self.out_dir / "encoders", self.arrays, self.cfg.modality_list, spec,
                      round=self.cfg.num_rounds, objective=self.cfg.objective)
        plots = plot_metrics(self.metrics.rows, self.out_dir / "plots")
        notes = [f"{self.cfg.num_rounds} rounds; modalities: {', '.join(self.cfg.modality_list)}"]
        notes += self.rejected
        write_report(self.out_dir, "visionfm-fed federated pretraining", self.cfg.to_flat(), self.metrics.rows,
                     plots, notes)
        return FederationResult(self.out_dir, self.cfg.num_rounds, self.arrays, self.metrics, self.rejected)
