"""The coordinator's round loop over a Flower Grid: send the global encoders, fold replies into a
running per-modality average as they arrive, checkpoint, evaluate, report.

Resume: when the run folder already holds complete round checkpoints, the loop restarts after the last
one with that round's global model, and metrics of later (unfinished) rounds are dropped, so nothing
is aggregated or counted twice.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from client.records import arrays_to_record, record_to_numpy
from server.checkpoints import latest_round, load_round, save_encoders, save_round
from server.progress import RoundProgress
from server.report import MetricsLog, plot_metrics, write_report
from strategies.fedavg import ModalityAccumulator, SiteReply, modality_of
from visionfm_core.pretraining import encoder_spec
from visionfm_core.run_config import RunConfig

logger = logging.getLogger(__name__)

CentralEvaluator = Callable[[dict[str, np.ndarray]], dict[str, dict[str, float]]]


@dataclass
class FederationResult:
    """What a finished run produced."""

    out_dir: Path
    rounds_completed: int
    arrays: dict[str, np.ndarray]
    metrics: MetricsLog
    rejected: list[str] = field(default_factory=list)


def _site_label(msg: Message, names: dict[int, str], site_names: list[str]) -> str:
    node = msg.metadata.src_node_id
    if node not in names:
        metrics = msg.content.metric_records.get("metrics", {}) if msg.has_content() else {}
        index = metrics.get("site-index")
        if index is not None and 0 <= int(index) < len(site_names):
            names[node] = site_names[int(index)]
        else:
            names[node] = f"site-{len(names) + 1}"
    return names[node]


def reply_problem(arrays: dict[str, np.ndarray], global_arrays: dict[str, np.ndarray]) -> str | None:
    """Why a site's arrays cannot be aggregated (unknown key, wrong shape or dtype, NaN/Inf), else None."""
    for key, value in arrays.items():
        reference = global_arrays.get(key)
        if reference is None:
            return f"unknown key {key!r}"
        if value.shape != reference.shape:
            return f"{key!r} has shape {value.shape}, expected {reference.shape}"
        if not np.issubdtype(value.dtype, np.floating):
            return f"{key!r} has dtype {value.dtype}"
        if not np.isfinite(value).all():
            return f"{key!r} contains NaN or Inf"
    return None


def _modality_metrics(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    grouped: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if "/" in key and isinstance(value, (int, float)):
            modality, name = key.split("/", 1)
            grouped.setdefault(modality, {})[name] = float(value)
    return grouped


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
        self.progress = RoundProgress(cfg.num_rounds, enabled=cfg.progress)

    # -- messaging ---------------------------------------------------------------------------------
    def _wait_for_nodes(self) -> list[int]:
        deadline = time.monotonic() + self.cfg.round_timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.cfg.min_sites:
                return nodes
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(nodes)} of the required {self.cfg.min_sites} sites connected")
            time.sleep(1.0)

    def _exchange(self, message_type: str, server_round: int, on_reply: Callable[[Message], None]) -> int:
        """Send the global model to every connected site; call `on_reply` for each reply as it arrives
        (streaming: replies are folded in and dropped, never all held at once). Returns replies seen."""
        nodes = self._wait_for_nodes()
        config = ConfigRecord({**self.cfg.to_flat(), "server-round": server_round})
        record = arrays_to_record(self.arrays)
        messages = [
            Message(RecordDict({"arrays": record, "config": config}), dst_node_id=node,
                    message_type=message_type, group_id=str(server_round))
            for node in nodes
        ]
        pending = set(self.grid.push_messages(messages))
        deadline = time.monotonic() + self.cfg.round_timeout
        seen = 0
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(pending):
                pending.discard(reply.metadata.reply_to_message_id)
                seen += 1
                on_reply(reply)
            if pending:
                time.sleep(self.poll_interval)
        if pending:
            logger.warning("round %d %s: %d site(s) did not answer within %.0fs", server_round, message_type,
                           len(pending), self.cfg.round_timeout)
        return seen

    # -- phases ------------------------------------------------------------------------------------
    def train_round(self, server_round: int) -> bool:
        """One aggregation round; returns False (global model unchanged) when too few sites succeeded."""
        accumulator = ModalityAccumulator()
        accepted: list[str] = []

        def fold(reply: Message) -> None:
            site = _site_label(reply, self.node_names, self.site_names)
            if reply.has_error():
                self._reject(server_round, site, f"site error: {reply.error.reason}")
                return
            arrays = record_to_numpy(reply.content.array_records["arrays"])
            problem = reply_problem(arrays, self.arrays)
            if problem is not None:
                self._reject(server_round, site, problem)
                return
            metrics = dict(reply.content.metric_records["metrics"])
            per_modality = _modality_metrics(metrics)
            counts = {m: int(v.get("num-examples", 0)) for m, v in per_modality.items()}
            sent = {modality_of(k) for k in arrays}
            if any(counts.get(m, 0) <= 0 for m in sent):
                self._reject(server_round, site, "an update without a positive example count")
                return
            accumulator.add(SiteReply(site, arrays, counts))
            accepted.append(site)
            for modality, values in per_modality.items():
                self.metrics.add(server_round, site, modality, "train", values)
            self.progress.site_done(site, float(np.mean([v.get("loss", np.nan) for v in per_modality.values()])))

        self.progress.start_round(server_round)
        self._exchange(MessageType.TRAIN, server_round, fold)
        if len(accepted) < self.cfg.min_sites:
            logger.error("round %d failed: %d accepted update(s), %d required; global model kept",
                         server_round, len(accepted), self.cfg.min_sites)
            return False
        self.arrays.update(accumulator.result())
        logger.info("round %d aggregated: %s", server_round,
                    ", ".join(f"{m} from {len(s)} site(s)" for m, s in sorted(accumulator.contributors.items())))
        return True

    def _reject(self, server_round: int, site: str, reason: str) -> None:
        line = f"round {server_round}: update from {site} rejected: {reason}"
        logger.warning(line)
        self.rejected.append(line)

    def evaluate(self, server_round: int) -> None:
        """Federated evaluation on each site's validation split, plus the server's central evaluation."""

        def record(reply: Message) -> None:
            site = _site_label(reply, self.node_names, self.site_names)
            if reply.has_error():
                logger.warning("round %d: evaluation failed at %s: %s", server_round, site, reply.error.reason)
                return
            for modality, values in _modality_metrics(dict(reply.content.metric_records["metrics"])).items():
                self.metrics.add(server_round, site, modality, "evaluate", values)

        self._exchange(MessageType.EVALUATE, server_round, record)
        if self.central_evaluator is not None:
            for modality, values in self.central_evaluator(self.arrays).items():
                self.metrics.add(server_round, "global-test", modality, "evaluate", values)
                self.progress.score(modality, values.get("knn_accuracy", float("nan")))

    # -- the run -----------------------------------------------------------------------------------
    def run(self) -> FederationResult:
        """Run (or resume) the federation and write checkpoints, metrics, plots and the report."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.json").write_text(json.dumps(self.cfg.to_flat(), indent=2, sort_keys=True))
        spec = encoder_spec(self.cfg)
        start = 1
        resumed = latest_round(self.out_dir)
        if resumed is not None:
            self.arrays.update(load_round(self.out_dir, resumed))
            self.metrics.drop_after(resumed)
            start = resumed + 1
            logger.info("resuming after round %d from %s", resumed, self.out_dir)
        else:
            self.metrics.rows = []
            self.evaluate(0)
            save_round(self.out_dir, 0, self.arrays, self.cfg.modality_list, spec, {"objective": self.cfg.objective})
            self.metrics.save()
        with self.progress:
            for server_round in range(start, self.cfg.num_rounds + 1):
                self.train_round(server_round)
                if server_round % self.cfg.eval_every == 0 or server_round == self.cfg.num_rounds:
                    self.evaluate(server_round)
                save_round(self.out_dir, server_round, self.arrays, self.cfg.modality_list, spec,
                           {"objective": self.cfg.objective})
                self.metrics.save()
        save_encoders(self.out_dir / "encoders", self.arrays, self.cfg.modality_list, spec,
                      round=self.cfg.num_rounds, objective=self.cfg.objective)
        plots = plot_metrics(self.metrics.rows, self.out_dir / "plots")
        notes = [f"{self.cfg.num_rounds} rounds; modalities: {', '.join(self.cfg.modality_list)}"]
        notes += self.rejected
        write_report(self.out_dir, "visionfm-fed federated pretraining", self.cfg.to_flat(), self.metrics.rows,
                     plots, notes)
        return FederationResult(self.out_dir, self.cfg.num_rounds, self.arrays, self.metrics, self.rejected)
