"""The fine-tuning phase of a run: federated rounds that train a task model on the global encoders.

`FineTunePhase` is a `Federation` (same messaging, streaming modality-aware FedAvg or robust rule,
rejection of bad replies, metrics log and report) whose messages carry `phase = "finetune"`. The task is
any of the task adapters: classification, segmentation, landmarks, detection or regression. Each round
it sends the global encoder per modality (plus the task head when the head is shared), folds the
sites' trained encoder and/or shared head into the average, and asks every site to score the new
global model (or the global encoder with its personal head) on its validation split. With a shared
head, the server also scores the global model on public labelled data (the simulation's test split, or
the bundled task set's held-out part) as `global-test`.

Rows are numbered after the pretraining rounds (`round = pretraining rounds + fine-tune round`, with
`finetune_round` in the row) and have phases "finetune" and "finetune-evaluate". Checkpoints go to
`checkpoints/finetune-round-NNNN/`; a round counts for resume only when its `round.json` exists and
records the same starting model, so a re-run pretraining never resumes a stale fine-tune.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from server.federation.progress import RoundProgress
from server.federation.report import plot_metrics, write_report
from server.federation.rounds import (
    FAILURE_FILE,
    CentralEvaluator,
    Federation,
    FederationFailedError,
    FederationResult,
    _modality_metrics,
    _site_label,
)
from strategies.fedavg import SiteReply
from strategies.protocol.task_models import (
    CLASSIFIER_PREFIX,
    HEADLINE,
    build_task_model,
    class_count,
    finetune_config,
    finetune_encoder_arrays,
    finetune_input_shape,
    initial_head,
    new_tuner,
    reported_scores,
    resolve_recipe,
    task_adapter,
    task_preprocess,
    task_samples,
)
from strategies.validation import validate_reply
from visionfm_core.errors import ConfigError
from visionfm_core.models.checkpoint import atomic_write_bytes, encoder_metadata, load_encoder, save_encoder
from visionfm_core.pretraining import BACKBONE_PREFIX, encoder_from_arrays, encoder_spec, modality_arrays
from visionfm_core.run_config import RunConfig
from visionfm_core.runtime import resolve_device
from visionfm_core.tasks.persistence import save_task_model
from visionfm_core.tasks.samples import TaskSample

logger = logging.getLogger(__name__)

MARKER = "round.json"
PHASES = ("finetune", "finetune-evaluate")
PLOTTED = ("finetune_loss", "accuracy", "auc", "kappa", "dice", "mre", "map50", "mae")


def finetune_round_dir(out_dir: Path, finetune_round: int) -> Path:
    return out_dir / "checkpoints" / f"finetune-round-{finetune_round:04d}"


def resolve_finetune_task(cfg: RunConfig) -> RunConfig:
    """The config every site fine-tunes with (sites must agree on the head's shape): a bundled
    `finetune-data` set fills in its task and settings; classification gets `finetune-classes` for
    every modality; any other task's settings must build its adapter. Errors name the key at fault."""
    if cfg.finetune_data:
        from strategies.protocol.task_sets import load_task_set

        task_set = load_task_set(cfg.finetune_data)
        if cfg.finetune_task not in ("classification", task_set.task):
            raise ConfigError("finetune-task", f"finetune-data {task_set.name!r} is a {task_set.task} task, "
                                               f"not {cfg.finetune_task}")
        if task_set.modality not in cfg.modality_list:
            raise ConfigError("finetune-data", f"{task_set.name!r} is {task_set.modality} data; the run's "
                                               f"modalities are {', '.join(cfg.modality_list)}")
        cfg = cfg.replace(finetune_task=task_set.task,
                          finetune_task_config=cfg.finetune_task_config or json.dumps(task_set.settings))
    resolved = cfg.replace(phase="finetune") if cfg.finetune_task != "classification" else _resolve_class_counts(cfg)
    for modality in finetune_modalities(resolved):  # names the bad key (preprocessing, input aspect)
        task_preprocess(resolved, task_adapter(resolved, modality), modality)
    # The task's own lr, layer decay and least steps where the run leaves them to it (every modality's
    # head is the same task kind, so any modality's adapter gives the same defaults).
    return resolve_recipe(resolved, task_adapter(resolved, finetune_modalities(resolved)[0]))


def finetune_modalities(cfg: RunConfig) -> list[str]:
    """The modalities that get a task head: a bundled task set's own, else every modality of the run."""
    if cfg.finetune_data:
        from strategies.protocol.task_sets import load_task_set

        return [load_task_set(cfg.finetune_data).modality]
    return cfg.modality_list


def _resolve_class_counts(cfg: RunConfig) -> RunConfig:
    """`finetune-classes` for every modality; modalities it leaves out take their simulation dataset's."""
    counts = cfg.finetune_class_counts()
    missing = [m for m in cfg.modality_list if m not in counts]
    if missing and cfg.scenario:
        from strategies.protocol.datasets import load_dataset
        from strategies.protocol.scenario import load_scenario

        datasets = load_scenario(cfg.scenario).datasets
        counts.update({m: load_dataset(datasets[m], m).num_classes for m in missing if m in datasets})
    for modality in cfg.modality_list:
        class_count(cfg.replace(finetune_classes=_format(counts)), modality)  # names a missing modality
    return cfg.replace(finetune_classes=_format(counts), phase="finetune")


def _format(counts: Mapping[str, int]) -> str:
    return ",".join(f"{m}={n}" for m, n in counts.items())


def load_init_encoders(cfg: RunConfig) -> dict[str, np.ndarray]:
    """`<modality>/backbone.*` arrays from the `init-encoders` folder (one `<modality>.safetensors` each)."""
    folder = Path(cfg.init_encoders)
    arrays: dict[str, np.ndarray] = {}
    for modality in cfg.modality_list:
        path = folder / f"{modality}.safetensors"
        if not path.is_file():
            raise ConfigError("init-encoders", f"no {modality} encoder: {path} is missing")
        state, _ = load_encoder(path)
        shared = {BACKBONE_PREFIX + k: v for k, v in state.items()}
        try:
            encoder_from_arrays(shared, cfg)
        except RuntimeError as exc:
            raise ConfigError("init-encoders", f"{path.name} does not fit arch {cfg.arch!r} "
                                               f"at {cfg.image_size} px, patch {cfg.patch_size}: {exc}") from exc
        arrays.update({f"{modality}/{k}": v.to(torch.float32).numpy() for k, v in shared.items()})
    return arrays


def finetune_arrays(pretrained: Mapping[str, np.ndarray], cfg: RunConfig) -> dict[str, np.ndarray]:
    """The fine-tune phase's global model: each modality's encoder, plus a seeded head when shared."""
    # Each position embedding is resampled once, here, to the fine-tuning input's patch grid
    # (`finetune-input-aspect`): every site then trains and returns arrays of the same shapes.
    arrays = finetune_encoder_arrays({k: np.asarray(v, dtype=np.float32) for k, v in pretrained.items()
                                      if k.split("/", 1)[1].startswith(BACKBONE_PREFIX)}, cfg)
    if cfg.finetune_head == "shared":
        for modality in finetune_modalities(cfg):
            head = initial_head(cfg, modality)
            arrays.update({f"{modality}/{CLASSIFIER_PREFIX}{k}": v.numpy() for k, v in head.items()})
    return arrays


def digest(arrays: Mapping[str, np.ndarray]) -> str:
    """A fingerprint of a global model (resume only continues from the same starting model)."""
    hasher = hashlib.sha256()
    for key in sorted(arrays):
        hasher.update(key.encode())
        hasher.update(np.ascontiguousarray(arrays[key]).tobytes())
    return hasher.hexdigest()


class TaskTestEvaluator:
    """Scores the global task model (encoder + shared head) of every modality on held-out public data:
    the bundled task set's test part, or (classification) the simulation dataset's test split. Neither
    is ever trained or selected on. Preprocessing is `visionfm finetune`'s (field of view; dense tasks
    scored on whole photographs at their own resolution, with test-time flips where the task has them).
    `thresholds` holds, per modality, the decision threshold chosen on validation data (the sites' or
    the arm's own) that the test is scored with."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.thresholds: dict[str, float] = {}

    def test_samples(self, modality: str) -> list[TaskSample]:
        from strategies.protocol.datasets import load_dataset
        from strategies.protocol.scenario import load_scenario
        from strategies.protocol.task_sets import load_task_set

        if self.cfg.finetune_data:
            task_set = load_task_set(self.cfg.finetune_data)
            return task_set.test if modality == task_set.modality else []
        datasets = load_scenario(self.cfg.scenario).datasets
        return task_samples(load_dataset(datasets[modality], modality).test) if modality in datasets else []

    def __call__(self, arrays: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
        cfg = self.cfg
        results: dict[str, dict[str, float]] = {}
        for modality in finetune_modalities(cfg):
            shared = modality_arrays({k: torch.from_numpy(v) for k, v in arrays.items()}, modality)
            head = {k[len(CLASSIFIER_PREFIX):]: v for k, v in shared.items() if k.startswith(CLASSIFIER_PREFIX)}
            test = self.test_samples(modality)
            if not head or not test:
                continue
            tuner = new_tuner(cfg, modality, self.device)
            if modality in self.thresholds and hasattr(tuner.task, "threshold"):
                tuner.task.threshold = self.thresholds[modality]
            model = build_task_model(tuner, cfg, shared, head, modality)
            preprocess = task_preprocess(cfg, tuner.task, modality)
            scores = tuner.evaluate(model, tuner.loader(test, preprocess, train=False), flips=preprocess.test_flips)
            # The test's own best threshold would be chosen on the test: only validation may choose it.
            results[modality] = {k: v for k, v in reported_scores(cfg.finetune_task, scores).items()
                                 if k not in ("best_threshold", "dice_at_best_threshold")}
            if hasattr(tuner.task, "threshold"):
                results[modality]["threshold"] = float(tuner.task.threshold)
        return results


def server_step(previous: Mapping[str, np.ndarray], averaged: Mapping[str, np.ndarray],
                lr: float) -> dict[str, np.ndarray]:
    """`previous + lr * (averaged - previous)` for every array the round averaged (float32)."""
    return {k: (previous[k] + np.float32(lr) * (v - previous[k])).astype(np.float32)
            for k, v in averaged.items() if k in previous and v.shape == previous[k].shape}


def task_test_evaluator(cfg: RunConfig) -> TaskTestEvaluator:
    """The held-out test scorer of the run's fine-tuning task (see `TaskTestEvaluator`)."""
    return TaskTestEvaluator(cfg)


def validation_threshold(replies: Iterable[tuple[float, float]], max_count: float) -> float | None:
    """The decision threshold for the global model: the mean of the sites' validation-best thresholds,
    weighted by their validation images. A site's value is a claim: anything outside (0, 1), non-finite,
    or with a count that is not in (0, `max_count`] (the coordinator's `max-site-examples`, so no site
    buys all the weight) is ignored. None when no site sent a usable one."""
    usable = [(t, n) for t, n in replies
              if np.isfinite(t) and 0.0 < t < 1.0 and np.isfinite(n) and 0 < n <= max_count]
    if not usable:
        return None
    weights = np.array([n for _, n in usable])
    return float(np.dot([t for t, _ in usable], weights) / weights.sum())


class FineTunePhase(Federation):
    """Runs `cfg.finetune_rounds` federated fine-tuning rounds after pretraining (or from given encoders)."""

    def __init__(self, grid: Grid, cfg: RunConfig, pretrained: Mapping[str, np.ndarray],
                 central_evaluator: CentralEvaluator | None = None, site_names: Iterable[str] = (),
                 round_offset: int = 0, poll_interval: float = 0.05) -> None:
        cfg = resolve_finetune_task(cfg)
        initial = finetune_arrays(pretrained, cfg)
        super().__init__(grid, cfg, initial, central_evaluator, site_names, poll_interval)
        self.round_offset = round_offset
        self.start_digest = digest(initial)
        # Per modality: the decision threshold the sites' validation chose (dense binary tasks).
        self.thresholds: dict[str, float] = {}
        self.progress = RoundProgress(cfg.finetune_rounds, enabled=cfg.progress)

    def _row_round(self, finetune_round: int) -> int:
        return self.round_offset + finetune_round

    def _expected(self) -> dict[str, np.ndarray]:
        """The part of the global model a site sends back: trained encoder and/or shared head."""
        return {k: v for k, v in self.arrays.items()
                if (self.cfg.finetune_encoder == "trained" and f"/{BACKBONE_PREFIX}" in k)
                or f"/{CLASSIFIER_PREFIX}" in k}

    def _aggregated(self) -> dict[str, np.ndarray]:
        return self._expected()

    def train_round(self, server_round: int) -> bool:
        """The parent's round (FedAvg or the robust rule, every reply checked), then, with a server learning
        rate other than 1 (`finetune-server-lr`), the global model moved that many times the averaged update
        from where the round started. Nothing else is kept between rounds, so a resumed run goes on alike."""
        previous = dict(self.arrays)
        aggregated = super().train_round(server_round)
        if aggregated and self.cfg.finetune_server_lr != 1.0:
            self.arrays.update(server_step(previous, self.arrays, self.cfg.finetune_server_lr))
        return aggregated

    def _record_train(self, server_round: int, site: str, modality: str, values: dict[str, float]) -> None:
        self.metrics.add(self._row_round(server_round), site, modality, "finetune",
                         {**values, "finetune-round": server_round})

    # -- one round ---------------------------------------------------------------------------------
    def _site_update(self, server_round: int, site: str, reply: Message) -> SiteReply | None:
        """Record a site's fine-tuning numbers and check its arrays against the shared part of the model."""
        parts = self._read_reply(server_round, site, reply)
        if parts is None or self._budget_refusal(server_round, site, parts):
            return None
        metrics, per_modality, counts, arrays = parts.metrics, parts.per_modality, parts.counts, parts.arrays
        if self.cfg.central_dp_clip > 0:
            counts = {m: min(c, 1) for m, c in counts.items()}  # central DP: every site counts once
        update = SiteReply(site, arrays, counts)
        expected = self._expected()
        if expected or arrays:  # frozen encoder + personal head: nothing is shared, nothing to check
            problem = validate_reply(update, expected)
            if problem is not None:
                self._reject(server_round, site, str(problem))
                return None
            update = self._central_dp_clipped(update)
        if not self._fresh_update(server_round, site, arrays):
            return None
        for modality, values in per_modality.items():
            self.metrics.add(self._row_round(server_round), site, modality, "finetune",
                             {**values, "finetune-round": server_round})
        self.metrics.add(self._row_round(server_round), site, "all", "transport",
                         {"bytes_sent": int(metrics.get("bytes-sent", 0)), "finetune-round": server_round})
        losses = [v.get("finetune-loss", np.nan) for v in per_modality.values()]
        self.progress.site_done(site, float(np.mean(losses)) if losses else float("nan"))
        return update

    def evaluate(self, server_round: int) -> None:
        """Every site scores the new global classifier (or its personalised one) on its validation split;
        with a shared head the server scores the global classifier on public test data."""
        row_round = self._row_round(server_round)
        thresholds: dict[str, list[tuple[float, float]]] = {}

        def record(reply: Message) -> None:
            site = _site_label(reply, self.node_names, self.site_names, self.destinations)
            if reply.has_error():
                logger.warning("fine-tune round %d: evaluation failed at %s: %s", server_round, site,
                               reply.error.reason)
                return
            for modality, values in _modality_metrics(dict(reply.content.metric_records["metrics"])).items():
                self.metrics.add(row_round, site, modality, "finetune-evaluate",
                                 {**values, "finetune-round": server_round})
                if "best_threshold" in values:
                    thresholds.setdefault(modality, []).append(
                        (float(values["best_threshold"]), float(values.get("count", values.get("num-examples", 0)))))

        if self._federated_evaluation():
            self._exchange(MessageType.EVALUATE, server_round, record)
        chosen = getattr(self.central_evaluator, "thresholds", None)
        for modality, replies in thresholds.items():
            threshold = validation_threshold(replies, self.cfg.max_site_examples)
            if threshold is not None:
                self.thresholds[modality] = threshold
                if isinstance(chosen, dict):
                    chosen[modality] = threshold
        if self.central_evaluator is not None and self.cfg.finetune_head == "shared":
            for modality, values in self.central_evaluator(self.arrays).items():
                self.metrics.add(row_round, "global-test", modality, "finetune-evaluate",
                                 {**values, "finetune-round": server_round})
                self.progress.score(modality, values.get(HEADLINE[self.cfg.finetune_task][0], float("nan")))

    # -- checkpoints and resume --------------------------------------------------------------------
    def _save_round(self, finetune_round: int) -> Path:
        folder = finetune_round_dir(self.out_dir, finetune_round)
        if folder.exists():
            shutil.rmtree(folder)
        self._save_models(folder, round=finetune_round)
        payload = json.dumps({"round": finetune_round, "phase": "finetune", "start-digest": self.start_digest},
                             indent=2, sort_keys=True).encode()
        atomic_write_bytes(folder / MARKER, lambda tmp: Path(tmp).write_bytes(payload))
        return folder

    def _save_models(self, folder: Path, task_model: bool = False, **meta: Any) -> None:
        """Per modality: the encoder (timm keys) and, when shared, the head, as safetensors files (their
        metadata gives the fine-tuning input shape); with `task_model`, also the whole task model
        `<modality>.task.safetensors` that `visionfm evaluate` / `predict` load."""
        spec = encoder_spec(self.cfg)
        for modality in self.cfg.modality_list:
            shared = modality_arrays({k: torch.from_numpy(v) for k, v in self.arrays.items()}, modality)
            backbone = {k[len(BACKBONE_PREFIX):]: v for k, v in shared.items() if k.startswith(BACKBONE_PREFIX)}
            head = {k[len(CLASSIFIER_PREFIX):]: v for k, v in shared.items() if k.startswith(CLASSIFIER_PREFIX)}
            shape = finetune_input_shape(self.cfg, task_adapter(self.cfg, modality), modality)
            metadata = encoder_metadata(spec, modality, phase="finetune", input_shape=list(shape), **meta)
            if shape != (self.cfg.image_size, self.cfg.image_size):  # the grid its position embedding is on
                metadata.update(timm_kwargs={**metadata["timm_kwargs"], "img_size": list(shape)}, image_size=shape[1])
            save_encoder(folder / f"{modality}.safetensors", backbone, metadata)
            if head:
                task = task_adapter(self.cfg, modality)
                if modality in self.thresholds and hasattr(task, "threshold"):
                    task.threshold = self.thresholds[modality]  # travels with the model, as finetune's does
                save_encoder(folder / f"{modality}.classifier.safetensors", head,
                             {**metadata, "part": "classifier", "task": task.kind,
                              "task_config": json.dumps(task.to_config()), **self._classification_meta(modality),
                              "finetune_encoder": self.cfg.finetune_encoder})
                if task_model:
                    self._save_task_model(folder / f"{modality}.task.safetensors", modality, shared, metadata)

    def _save_task_model(self, path: Path, modality: str, shared: Mapping[str, torch.Tensor],
                         metadata: dict[str, Any]) -> None:
        """The global task model as `visionfm finetune` writes one (encoder, head, the task with its
        validation-chosen threshold, preprocessing with the federation's input shape), so that
        `visionfm evaluate` and `visionfm predict` run it as they run a single site's."""
        tuner = new_tuner(self.cfg, modality, torch.device("cpu"))
        if modality in self.thresholds and hasattr(tuner.task, "threshold"):
            tuner.task.threshold = self.thresholds[modality]
        head = {k[len(CLASSIFIER_PREFIX):]: v for k, v in shared.items() if k.startswith(CLASSIFIER_PREFIX)}
        model = build_task_model(tuner, self.cfg, shared, head, modality)
        save_task_model(path, model, tuner.task, task_preprocess(self.cfg, tuner.task, modality), metadata,
                        extra={"finetune": finetune_config(self.cfg).to_dict(), "federated": {
                            "rounds": self.cfg.finetune_rounds, "finetune_encoder": self.cfg.finetune_encoder,
                            "input_aspect": self.cfg.finetune_aspect_setting(modality)}})

    def _classification_meta(self, modality: str) -> dict[str, Any]:
        if self.cfg.finetune_task != "classification":
            return {}
        return {"num_classes": class_count(self.cfg, modality), "finetune_mode": self.cfg.finetune_mode}

    def resumable_round(self) -> int | None:
        """The last complete fine-tune round that started from this run's model, if any."""
        rounds = []
        for folder in (self.out_dir / "checkpoints").glob("finetune-round-*"):
            marker = folder / MARKER
            if marker.is_file() and json.loads(marker.read_text()).get("start-digest") == self.start_digest:
                rounds.append(int(folder.name.rsplit("-", 1)[1]))
        return max(rounds) if rounds else None

    def _load_round(self, finetune_round: int) -> None:
        folder = finetune_round_dir(self.out_dir, finetune_round)
        for modality in self.cfg.modality_list:
            for name, prefix in ((f"{modality}.safetensors", BACKBONE_PREFIX),
                                 (f"{modality}.classifier.safetensors", CLASSIFIER_PREFIX)):
                if (folder / name).is_file():
                    state, _ = load_encoder(folder / name)
                    self.arrays.update({f"{modality}/{prefix}{k}": v.numpy() for k, v in state.items()})

    # -- the phase ---------------------------------------------------------------------------------
    def run(self) -> FederationResult:
        """Run (or resume) the fine-tune rounds; write checkpoints, metrics, plots and the report."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not (self.out_dir / "config.json").is_file():  # no pretraining phase wrote it
            (self.out_dir / "config.json").write_text(json.dumps(self.cfg.to_flat(), indent=2, sort_keys=True))
        resumed = self.resumable_round() if self.cfg.resume else None
        if resumed is not None:
            self._load_round(resumed)
            last_kept = self._row_round(resumed)
            self.metrics.rows = [r for r in self.metrics.rows
                                 if not (r["phase"] in PHASES or "finetune_round" in r) or int(r["round"]) <= last_kept]
            logger.info("resuming fine-tuning after fine-tune round %d", resumed)
            if self.cfg.central_dp_noise > 0:
                self.central_accountant.step(resumed)
        else:
            for folder in (self.out_dir / "checkpoints").glob("finetune-round-*"):
                shutil.rmtree(folder)
            self.metrics.rows = [r for r in self.metrics.rows if not (r["phase"] in PHASES or "finetune_round" in r)]
        start = 1 if resumed is None else resumed + 1
        (self.out_dir / FAILURE_FILE).unlink(missing_ok=True)
        with self.progress:
            for finetune_round in range(start, self.cfg.finetune_rounds + 1):
                try:
                    self._end_round(finetune_round, self.train_round(finetune_round))
                except FederationFailedError as exc:
                    self._record_failure(exc, finetune_round - 1 if finetune_round > 1 else None, "fine-tune round")
                    raise
                if finetune_round % self.cfg.eval_every == 0 or finetune_round == self.cfg.finetune_rounds:
                    self.evaluate(finetune_round)
                self.metrics.save()  # before the marker, as in pretraining
                self._save_round(finetune_round)
        self._save_models(self.out_dir / "finetuned", task_model=True, round=self.cfg.finetune_rounds)
        plots = plot_metrics(self.metrics.rows, self.out_dir / "plots")
        plots += plot_metrics([r for r in self.metrics.rows if r["phase"] in PHASES], self.out_dir / "plots", PLOTTED)
        write_report(self.out_dir, "visionfm-fed federated pretraining and fine-tuning", self.cfg.to_flat(),
                     self.metrics.rows, plots, self._notes())
        return FederationResult(self.out_dir, self.cfg.finetune_rounds, self.arrays, self.metrics, self.rejected)

    def _notes(self) -> list[str]:
        last = self._row_round(self.cfg.finetune_rounds)
        notes = [f"fine-tuning ({self.cfg.finetune_task}): {self.cfg.finetune_rounds} rounds, encoder "
                 f"{self.cfg.finetune_encoder}, head {self.cfg.finetune_head}, {self.cfg.finetune_epochs} epoch(s) "
                 f"per round and at least {self.cfg.finetune_min_steps} steps per site in all, lr "
                 f"{self.cfg.finetune_lr:g}, layer decay {self.cfg.finetune_layer_decay:g}"]
        headline = HEADLINE[self.cfg.finetune_task]
        for row in sorted(self.metrics.select(round=last, phase="finetune-evaluate"),
                          key=lambda r: (r["site"], r["modality"])):
            scores = ", ".join(f"{k} {row[k]:.3f}" for k in headline if k in row)
            notes.append(f"fine-tune round {self.cfg.finetune_rounds}, {row['site']} {row['modality']}: {scores}")
        return notes + self.rejected
