"""The one fine-tuning trainer every downstream task uses; the task adapter supplies the rest.

AdamW with layer-wise learning-rate decay (the head and last block at the full rate, each earlier
block ``layer_decay`` times less), linear warm-up then cosine decay, mixed precision where the
device has it, gradient clipping, and model selection on the validation split (never on test).

Seams for a federated client, which rebuilds everything per round: ``build_model`` ->
``init_state(model, total_steps, start_step)`` -> ``train_epochs(state, loader, epochs)`` ->
``evaluate(model, loader)``, with ``get_weights`` / ``set_weights`` to move the encoder's and the
head's weights as ``dict[str, Tensor]`` (timm key names for the encoder).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from visionfm_core.compile import check_compile_mode, mark_step_begin, maybe_compile
from visionfm_core.errors import ConfigError, DataError
from visionfm_core.models.heads import TaskHead, TaskModel, encoder_dims
from visionfm_core.progress import NO_PROGRESS, EpochLine, ProgressReporter
from visionfm_core.runtime import autocast_dtype, autocast_for, seed_everything, torch_threads
from visionfm_core.tasks.adapters.base import Regime, TaskAdapter
from visionfm_core.tasks.data import Preprocess, TaskDataset, collate, move, select
from visionfm_core.tasks.samples import TaskSample
from visionfm_core.tasks.tiles import (
    FieldOfView,
    flip_averaged,
    sliding_window,
    to_source,
    to_working,
    working_scale,
)
from visionfm_core.tasks.weight_average import WeightAverage

logger = logging.getLogger(__name__)

WeightPart = Literal["encoder", "head", "all"]
_NO_DECAY_NAMES = frozenset({"cls_token", "pos_embed", "reg_token", "dist_token", "mask_token"})


@dataclass
class FineTuneConfig:
    """Hyper-parameters of one fine-tuning run (defaults follow RETFound/VisionFM, scaled down)."""

    regime: Regime = "full"
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    encoder_lr_scale: float = 1.0
    layer_decay: float = 0.65
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr: float = 1e-6
    grad_clip: float | None = 3.0
    patience: int | None = None
    select_metric: str | None = None
    seed: int = 0
    min_steps: int = 0
    min_steps_per_epoch: int = 4
    max_validations: int = 12
    num_workers: int = 0
    eval_batch_size: int | None = None
    mixed_precision: bool = True
    threads: int | None = None
    # torch.compile of the training forward: "auto" (CUDA only), "on", "off" (visionfm_core/compile.py).
    compile: str = "auto"
    # Decay of an exponential moving average of the weights (visionfm_core/tasks/weight_average.py);
    # when > 0, ``fit`` validates, selects and returns the averaged weights. 0 turns it off.
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.regime not in ("frozen", "full"):
            raise ConfigError("regime", f"unknown regime {self.regime!r}; use 'frozen' or 'full'")
        if self.min_steps < 0 or self.min_steps_per_epoch < 1 or self.max_validations < 1:
            raise ConfigError("min_steps", "min_steps >= 0, min_steps_per_epoch >= 1, max_validations >= 1")
        for key in ("epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be at least 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ConfigError("lr", f"must be positive, got {self.lr}")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError("layer_decay", f"must lie in (0, 1], got {self.layer_decay}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError("ema_decay", f"must lie in [0, 1), got {self.ema_decay}")
        self.compile = check_compile_mode(self.compile)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FineTuneConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(sorted(unknown)[0], "not a fine-tuning setting")
        return cls(**raw)


def layer_id(name: str, depth: int) -> int:
    """Depth of an encoder parameter: embeddings 0, block i -> i + 1, final norm depth + 1."""
    if name.split(".")[0] in _NO_DECAY_NAMES or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def _decays(name: str, param: Tensor) -> bool:
    return param.ndim > 1 and name.split(".")[0] not in _NO_DECAY_NAMES


def parameter_groups(model: TaskModel, config: FineTuneConfig) -> list[dict[str, Any]]:
    """AdamW groups with an ``lr_scale`` each; the frozen regime trains the head only."""
    groups: dict[tuple[str, int, bool], dict[str, Any]] = {}

    def add(part: str, layer: int, scale: float, name: str, param: Tensor) -> None:
        decay = _decays(name, param)
        group = groups.setdefault(
            (part, layer, decay),
            {"params": [], "lr_scale": scale, "weight_decay": config.weight_decay if decay else 0.0},
        )
        group["params"].append(param)

    for name, param in model.head.named_parameters():
        if param.requires_grad:
            add("head", 0, 1.0, name, param)
    if config.regime == "full":
        depth = len(model.encoder.blocks)  # type: ignore[arg-type]
        for name, param in model.encoder.named_parameters():
            if param.requires_grad:
                layer = layer_id(name, depth)
                scale = config.encoder_lr_scale * config.layer_decay ** (depth + 1 - layer)
                add("encoder", layer, scale, name, param)
    return list(groups.values())


def _fastest_adamw(groups: list[dict[str, Any]]) -> dict[str, bool]:
    """AdamW's fused kernel where every parameter is a floating-point tensor on a device that has
    it (CPU and CUDA): one pass per parameter instead of the for-loop kernel's dozen small ops; on
    the CPU the segmentation step's optimiser update takes about 0.6x the time. Elsewhere PyTorch's
    own default."""
    params = [p for group in groups for p in group["params"]]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if fused else {}


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """Linear warm-up to ``peak`` then cosine decay to ``floor`` at ``total_steps``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


@dataclass
class TrainState:
    """A model being trained and its optimiser; ``step`` counts optimiser steps across rounds."""

    model: TaskModel
    optimizer: torch.optim.Optimizer
    total_steps: int
    warmup_steps: int
    step: int = 0
    scaler: torch.amp.GradScaler | None = None
    # The model's training forward, compiled where FineTuneConfig.compile asks (the model itself unwrapped).
    forward: Callable[[Tensor], Any] | None = None
    # The moving average of the weights, updated after every step (FineTuneConfig.ema_decay > 0).
    average: WeightAverage | None = None


@dataclass
class EpochRecord:
    epoch: int
    train: dict[str, float]
    validation: dict[str, float]


@dataclass
class FitResult:
    """The model with its best-on-validation weights restored, and how it got there."""

    model: TaskModel
    best_epoch: int
    best_validation: dict[str, float]
    selection_metric: str
    history: list[EpochRecord] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    steps: int = 0
    batch_size: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Schedule:
    """How a run spends its optimiser steps: the batch fits the set (at least ``min_steps_per_epoch``
    steps an epoch) and the epochs are as many as ``epochs`` asks or ``min_steps`` needs."""

    batch_size: int
    steps_per_epoch: int
    epochs: int
    validate_every: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @classmethod
    def plan(cls, config: FineTuneConfig, examples: int, max_batch: int | None = None) -> Schedule:
        batch = max(1, min(config.batch_size, max_batch or config.batch_size, examples // config.min_steps_per_epoch))
        drop_last = examples > batch
        per_epoch = max(1, examples // batch if drop_last else math.ceil(examples / batch))
        epochs = max(config.epochs, math.ceil(config.min_steps / per_epoch))
        return cls(batch, per_epoch, epochs, max(1, math.ceil(epochs / config.max_validations)))


# A moving average of the weights spans at most 1 / AVERAGED_SHARE_INVERSE of a run's steps.
AVERAGED_SHARE_INVERSE = 8

# Validation images kept decoded between validations (a small-data run's whole validation set).
VALIDATION_KEPT = 16


def get_weights(model: TaskModel, part: WeightPart = "encoder") -> dict[str, Tensor]:
    """Detached CPU copies of the encoder's (timm keys), the head's, or both (prefixed) weights."""
    if part == "all":
        return {f"{p}.{k}": v for p in ("encoder", "head") for k, v in get_weights(model, p).items()}  # type: ignore[arg-type]
    module: nn.Module = model.encoder if part == "encoder" else model.head
    return {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()}


def set_weights(model: TaskModel, weights: dict[str, Tensor], part: WeightPart = "encoder") -> None:
    """Load weights from :func:`get_weights` (strict: every key must match)."""
    if part == "all":
        for name in ("encoder", "head"):
            prefix = f"{name}."
            set_weights(model, {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}, name)  # type: ignore[arg-type]
        return
    module: nn.Module = model.encoder if part == "encoder" else model.head
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise ConfigError(part, f"weights do not fit the model: {exc}") from exc


def _no_targets(sample: TaskSample, window: Any, source_size: tuple[int, int]) -> dict[str, Any]:
    return {}


def selection_score(validation: dict[str, float], metric: str, higher: bool) -> tuple[int, float]:
    """Larger is better. An epoch where the metric is defined beats one where it is nan (e.g. AUC on a
    validation split with one class); among nan epochs the lower validation loss wins."""
    value = validation[metric]
    if math.isnan(value):
        loss = validation.get("loss", float("nan"))
        return (0, -loss if not math.isnan(loss) else -math.inf)
    return (1, value if higher else -value)


class FineTuner:
    """Fine-tunes an encoder plus a task head; see the module docstring for the federated seams."""

    def __init__(self, task: TaskAdapter, config: FineTuneConfig, device: torch.device | str = "cpu") -> None:
        self.task = task
        self.config = config
        self.device = torch.device(device)
        self.selection_metric = config.select_metric or task.selection_metric
        self.progress: ProgressReporter = NO_PROGRESS  # set by the CLI: bars or one line per epoch

    # --- building -------------------------------------------------------------------------------------

    def build_model(self, encoder: nn.Module, head: TaskHead | None = None) -> TaskModel:
        """Encoder plus the task's head (a fresh one unless given), on the device."""
        if head is None:
            embed_dim, depth, patch_size = encoder_dims(encoder)
            head = self.task.build_head(embed_dim, depth, patch_size, self.config.regime)
        model = TaskModel(encoder, head, freeze_encoder=self.config.regime == "frozen")
        return model.to(self.device)

    def init_state(
        self, model: TaskModel, total_steps: int, start_step: int = 0, steps_per_epoch: int | None = None
    ) -> TrainState:
        groups = parameter_groups(model, self.config)
        optimizer = torch.optim.AdamW(groups, lr=self.config.lr, betas=(0.9, 0.999), **_fastest_adamw(groups))
        per_epoch = steps_per_epoch or max(1, total_steps // self.config.epochs)
        # Warm-up: an epoch's worth, but never more than a tenth of a long run's steps.
        warmup = min(round(self.config.warmup_epochs * per_epoch), max(1, total_steps // 10))
        scaler = None
        if self.config.mixed_precision and autocast_dtype(self.device) == torch.float16:
            scaler = torch.amp.GradScaler(self.device.type)  # fp16 needs loss scaling; bf16 does not
        forward = maybe_compile(model, self.config.compile, self.device, "the fine-tuning model")
        average = None
        if self.config.ema_decay > 0:
            # The average spans at most the last eighth of the run: a short run (a lowered --min-steps)
            # must not average in the weights it started from.
            decay = min(self.config.ema_decay, 1.0 - AVERAGED_SHARE_INVERSE / max(1, total_steps))
            average = WeightAverage(model, decay) if decay > 0 else None
        return TrainState(model, optimizer, max(1, total_steps), warmup, start_step, scaler, forward, average)

    def loader(
        self,
        samples: Sequence[TaskSample],
        preprocess: Preprocess,
        train: bool,
        with_targets: bool = True,
        batch_size: int | None = None,
        keep_decoded: int | None = None,
    ) -> DataLoader[Any]:
        """Batches of ``samples``; ``with_targets=False`` for unlabelled images (prediction only);
        ``keep_decoded`` images stay decoded in memory (default: a training set's first 64)."""
        prepare = self.task.prepare if with_targets else _no_targets
        dataset = TaskDataset(samples, preprocess, prepare, train=train, keep_decoded=keep_decoded)
        if batch_size is None:
            batch_size = self.config.batch_size if train else (self.config.eval_batch_size or self.config.batch_size)
        generator = torch.Generator().manual_seed(self.config.seed)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            collate_fn=collate,
            generator=generator,
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
            # BatchNorm in the probe cannot train on a last batch of one image.
            drop_last=train and len(dataset) > batch_size,
        )

    # --- the per-round seams -------------------------------------------------------------------------

    def train_epochs(self, state: TrainState, loader: DataLoader[Any], epochs: int = 1) -> dict[str, float]:
        """Train ``epochs`` passes; returns mean loss, steps taken and the last learning rate."""
        model, config = state.model, self.config
        model.train()
        total_loss, steps, lr = 0.0, 0, 0.0
        with torch_threads(config.threads):
            for _ in range(epochs):
                for batch in loader:
                    lr = learning_rate(state.step, state.total_steps, state.warmup_steps, config.lr, config.min_lr)
                    for group in state.optimizer.param_groups:
                        group["lr"] = lr * group["lr_scale"]
                    batch = move(batch, self.device)
                    mark_step_begin(config.compile, self.device)
                    with autocast_for(self.device, config.mixed_precision):
                        outputs = (state.forward or model)(batch["image"])
                    loss = self.task.loss(outputs, batch)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite training loss at step {state.step}; lower the lr")
                    state.optimizer.zero_grad(set_to_none=True)
                    self._backward_and_step(state, loss)
                    if state.average is not None:  # of the model itself, not of a DDP wrapper around it
                        state.average.update(model.module if isinstance(model, DistributedDataParallel) else model)
                    total_loss += float(loss.detach())
                    steps += 1
                    state.step += 1
                    self.progress.advance("train")
        return {"loss": total_loss / max(1, steps), "steps": float(steps), "lr": lr}

    def _backward_and_step(self, state: TrainState, loss: Tensor) -> None:
        params = [p for g in state.optimizer.param_groups for p in g["params"]]
        if state.scaler is not None:
            state.scaler.scale(loss).backward()
            state.scaler.unscale_(state.optimizer)
        else:
            loss.backward()
        if self.config.grad_clip:
            nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        if state.scaler is not None:
            state.scaler.step(state.optimizer)
            state.scaler.update()
        else:
            state.optimizer.step()

    # --- whole photographs at their own resolution (tiled dense tasks) ---------------------------------

    def _tiled(self, loader: DataLoader[Any]) -> TaskDataset | None:
        dataset = loader.dataset
        if isinstance(dataset, TaskDataset) and dataset.preprocess.tiles and hasattr(self.task, "source_meter"):
            return dataset
        return None

    def source_probabilities(self, model: TaskModel, dataset: TaskDataset, index: int, flips: bool = False) -> Tensor:
        """(C, H, W) class probabilities for every source pixel of sample ``index`` (tiles, blended;
        with ``flips`` each tile's scores averaged over its four mirror images)."""
        preprocess = dataset.preprocess
        image, fov = dataset.load(index)
        fov = fov or FieldOfView.of(image, detect=False)
        mean = torch.tensor(preprocess.mean).view(3, 1, 1)
        std = torch.tensor(preprocess.std).view(3, 1, 1)

        def forward(tiles: Tensor) -> Tensor:
            with autocast_for(self.device, self.config.mixed_precision):
                logits = model(tiles)
            assert isinstance(logits, Tensor)
            return torch.softmax(logits.float(), dim=1)

        batch = self.config.eval_batch_size or self.config.batch_size
        scores = flip_averaged(forward) if flips else forward
        # With ``test_scales`` (and ``flips``: a saved model's evaluation and prediction) the photograph
        # is predicted at each scale of the working resolution and the source-pixel scores averaged.
        scales = preprocess.test_scales if flips else (1.0,)
        total: Tensor | None = None
        for factor in scales:
            working, _ = to_working(image, fov, working_scale(fov, preprocess.fov_diameter) * factor)
            normalised = ((working - mean) / std).to(self.device)
            probabilities = sliding_window(scores, normalised, preprocess.image_size, preprocess.overlap, batch)
            source = to_source(probabilities, fov, image.shape[0], image.shape[1])
            total = source if total is None else total.add_(source)
        assert total is not None
        return total / len(scales) if len(scales) > 1 else total

    def _evaluate_source(self, model: TaskModel, dataset: TaskDataset, flips: bool) -> dict[str, float]:
        meter = self.task.source_meter()  # type: ignore[attr-defined]
        for index, sample in enumerate(dataset.samples):
            try:
                probabilities = self.source_probabilities(model, dataset, index, flips)
                labels = self.task.source_labels(sample, tuple(probabilities.shape[-2:]))  # type: ignore[attr-defined]
            except DataError as exc:
                dataset._skip(exc)
                continue
            meter.update(probabilities, labels)
        results: dict[str, float] = meter.compute()
        results["skipped"] = float(len(dataset.skipped))
        return results

    @torch.no_grad()
    def evaluate(self, model: TaskModel, loader: DataLoader[Any], flips: bool = False) -> dict[str, float]:
        """Metrics of the task on ``loader`` (plus ``loss``), the model in eval mode; tiled dense
        tasks are scored on whole photographs at their own resolution (with ``flips``: test-time
        mirror averaging, :func:`~visionfm_core.tasks.tiles.flip_averaged`)."""
        was_training = model.training
        tiled = self._tiled(loader)
        if tiled is not None:
            model.eval()
            with torch_threads(self.config.threads):
                results = self._evaluate_source(model, tiled, flips)
            model.train(was_training)
            return results
        model.eval()
        meter = self.task.meter()
        total_loss, images = 0.0, 0
        with torch_threads(self.config.threads):
            for batch in loader:
                batch = select(batch, batch["valid"])
                if len(batch["index"]) == 0:
                    continue
                batch = move(batch, self.device)
                with autocast_for(self.device, self.config.mixed_precision):
                    outputs = model(batch["image"])
                count = len(batch["index"])
                total_loss += float(self.task.loss(outputs, batch)) * count
                images += count
                meter.update(outputs, batch)
                self.progress.advance("evaluate")
        model.train(was_training)
        results = meter.compute()
        results["loss"] = total_loss / images if images else float("nan")
        results["skipped"] = float(len(getattr(loader.dataset, "skipped", {})))
        return results

    @torch.no_grad()
    def predict(self, model: TaskModel, loader: DataLoader[Any], flips: bool = False) -> list[dict[str, Any]]:
        """Per-sample predictions in source coordinates, each with its sample ``index`` (``flips``:
        tiled dense tasks average each tile over its mirror images)."""
        model.eval()
        results: list[dict[str, Any]] = []
        tiled = self._tiled(loader)
        if tiled is not None:
            with torch_threads(self.config.threads):
                for index in range(len(tiled.samples)):
                    try:
                        probabilities = self.source_probabilities(model, tiled, index, flips)
                    except DataError as exc:
                        tiled._skip(exc)
                        continue
                    results.append({"index": index, **self.task.source_prediction(probabilities)})  # type: ignore[attr-defined]
            return results
        with torch_threads(self.config.threads):
            for batch in loader:
                batch = select(batch, batch["valid"])
                if len(batch["index"]) == 0:
                    continue
                batch = move(batch, self.device)
                with autocast_for(self.device, self.config.mixed_precision):
                    outputs = model(batch["image"])
                for index, prediction in zip(
                    batch["index"].tolist(), self.task.predictions(outputs, batch), strict=True
                ):
                    results.append({"index": index, **prediction})
                self.progress.advance("predict")
        return results

    # --- the single-site entry point -----------------------------------------------------------------

    def plan(self, examples: int) -> Schedule:
        """How ``fit`` spends its steps on ``examples`` training inputs (a data-parallel tuner splits it)."""
        return Schedule.plan(self.config, examples, self.task.max_batch_size)

    def fit(
        self,
        encoder: nn.Module,
        train_samples: Sequence[TaskSample],
        val_samples: Sequence[TaskSample],
        preprocess: Preprocess,
        head: TaskHead | None = None,
    ) -> FitResult:
        """Train on ``train_samples``, pick the epoch that is best on ``val_samples``, restore it."""
        if not val_samples:
            raise ConfigError("validation", "model selection needs a validation split (never the test split)")
        seed_everything(self.config.seed)
        self.task.check(list(train_samples) + list(val_samples))
        self.task.fit_to_data(train_samples)
        model = self.build_model(encoder, head)
        train_set = TaskDataset(train_samples, preprocess, self.task.prepare, train=True)
        schedule = self.plan(len(train_set))
        train_loader = self.loader(train_samples, preprocess, train=True, batch_size=schedule.batch_size)
        # Validated up to 12 times: a small validation set stays decoded (and standardised) in memory.
        val_loader = self.loader(val_samples, preprocess, train=False, keep_decoded=VALIDATION_KEPT)
        state = self.init_state(model, schedule.total_steps, steps_per_epoch=schedule.steps_per_epoch)
        logger.info(
            "schedule: %d optimiser steps (%d epochs of %d, batch %d), warm-up %d steps",
            schedule.total_steps,
            schedule.epochs,
            schedule.steps_per_epoch,
            schedule.batch_size,
            state.warmup_steps,
        )
        metric, higher = self.selection_metric, self.task.higher_is_better
        if metric in ("loss", "mre", "mae", "rmse"):
            higher = False
        best_score: tuple[int, float] | None = None
        best_state: dict[str, Tensor] = {}
        best_epoch, best_validation, history, waited = 0, {}, [], 0
        # With weight averaging, the averaged weights are what is validated, selected and returned.
        scored: TaskModel = state.average.module if state.average is not None else model  # type: ignore[assignment]
        self.progress.start("train", schedule.total_steps, "fine-tuning")
        for epoch in range(schedule.epochs):
            epoch_started = time.perf_counter()
            train_metrics = self.train_epochs(state, train_loader, 1)
            last = epoch == schedule.epochs - 1
            if not last and (epoch + 1) % schedule.validate_every:
                # Long runs on small sets validate a bounded number of times; the epoch still reports.
                self.progress.epoch(EpochLine(epoch + 1, schedule.epochs, train_metrics["loss"],
                                              time.perf_counter() - epoch_started))
                continue
            validation = self.evaluate(scored, val_loader)
            if metric not in validation:
                raise ConfigError(
                    "select_metric",
                    f"{metric!r} is not a {self.task.kind} metric; choose from {', '.join(sorted(validation))}",
                )
            history.append(EpochRecord(epoch, train_metrics, validation))
            logger.info(
                "epoch %d/%d (step %d): train loss %.4f, validation %s %.4f",
                epoch + 1,
                schedule.epochs,
                state.step,
                train_metrics["loss"],
                metric,
                validation[metric],
            )
            self.progress.epoch(EpochLine(epoch + 1, schedule.epochs, train_metrics["loss"],
                                          time.perf_counter() - epoch_started, metric, validation[metric]))
            score = selection_score(validation, metric, higher)
            if best_score is None or score > best_score:
                best_score, best_epoch, best_validation, waited = score, epoch, validation, 0
                best_state = copy.deepcopy({k: v.detach().to("cpu") for k, v in scored.state_dict().items()})
            else:
                waited += 1
                if self.config.patience is not None and waited >= self.config.patience:
                    break
        self.progress.finish("train", f"fine-tuned on {len(train_samples)} images, best epoch {best_epoch + 1}")
        model.load_state_dict(best_state)
        warnings: list[str] = []
        if len(history) > 1 and best_epoch == history[0].epoch:
            warnings.append(
                f"the first validated epoch ({best_epoch + 1}) was the best on validation {metric}: the model "
                "probably learnt nothing after it (try more steps, a lower learning rate or more data)"
            )
            logger.warning(warnings[-1])
        if preprocess.test_flips and self._tiled(val_loader) is not None:
            # The saved model predicts with mirror averaging: its threshold is chosen on the same
            # scores (one more pass over the validation images, not one per validation).
            best_validation = self.evaluate(model, val_loader, flips=True)
        if "best_threshold" in best_validation and hasattr(self.task, "threshold"):
            # The decision threshold that was best on validation (Dice, or balanced accuracy for a
            # binary classifier) travels with the model; the reported validation metrics use it.
            self.task.threshold = float(best_validation["best_threshold"])
            if self._tiled(val_loader) is None:  # cheap to score again (tiled: dice_at_best_threshold)
                best_validation = {**best_validation, **self.evaluate(model, val_loader)}
        predicted, present = best_validation.get("predicted_classes"), best_validation.get("true_classes")
        if predicted is not None and present is not None and predicted < 2 <= present:
            warnings.append(
                "the selected model predicts one class for every validation image: it has learnt nothing "
                "about the rarer classes (check the class balance and the amount of data)"
            )
            logger.warning(warnings[-1])
        skipped = {
            **getattr(train_loader.dataset, "skipped", {}),
            **getattr(val_loader.dataset, "skipped", {}),
        }
        return FitResult(
            model,
            best_epoch,
            best_validation,
            metric,
            history,
            skipped,
            steps=state.step,
            batch_size=schedule.batch_size,
            warnings=warnings,
        )
