"""What every task adapter provides to the one fine-tuning trainer.

An adapter knows its head, how to place a sample's targets in the input window, its loss, how to
accumulate metrics over an evaluation, which validation metric selects the model, and how to turn
outputs into per-image predictions in source-image coordinates. Everything else (optimiser,
schedule, precision, model selection, federation seams) lives once, in the trainer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from torch import Tensor

from visionfm_core.models.heads import HeadOutput, TaskHead
from visionfm_core.tasks.data import Batch
from visionfm_core.tasks.geometry import Window
from visionfm_core.tasks.samples import TaskSample

Regime = Literal["frozen", "full"]


class Meter(ABC):
    """Accumulates one evaluation pass; ``compute`` returns plain numbers (nan when undefined)."""

    @abstractmethod
    def update(self, outputs: HeadOutput, batch: Batch) -> None: ...

    @abstractmethod
    def compute(self) -> dict[str, float]: ...


class TaskAdapter(ABC):
    """Loss, targets, metrics and predictions of one task kind."""

    kind: ClassVar[str] = ""
    selection_metric: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    # Largest useful batch (None: the configured one); big dense inputs pay more for steps than for batch.
    max_batch_size: ClassVar[int | None] = None
    # Optimiser steps a run takes at least when the user does not say (``visionfm finetune --min-steps``).
    default_min_steps: ClassVar[int] = 300
    # Peak learning rate of the head when the user does not say (``visionfm finetune --lr``).
    default_lr: ClassVar[float] = 1e-3
    # Decay of the moving average of the weights that is validated and saved (0: the weights as trained;
    # ``visionfm finetune --ema-decay``).
    default_ema_decay: ClassVar[float] = 0.0
    # Validations a `visionfm finetune` run makes at most (FineTuneConfig.max_validations) when the user does
    # not say (``--max-validations``).
    default_max_validations: ClassVar[int] = 12
    # Encoder trained from scratch when no pretrained one is given (``visionfm finetune --arch/--patch-size``;
    # a pretrained ``--encoder`` brings its own).
    default_arch: ClassVar[str] = "micro"
    default_patch_size: ClassVar[int] = 16
    # Inputs a step when the user does not say (``visionfm finetune --batch-size``; at most max_batch_size).
    default_batch_size: ClassVar[int] = 16

    @abstractmethod
    def build_head(self, embed_dim: int, depth: int, patch_size: int, regime: Regime) -> TaskHead:
        """A fresh head for an encoder of this width, depth and patch size."""

    @abstractmethod
    def prepare(self, sample: TaskSample, window: Window, source_size: tuple[int, int]) -> dict[str, Any]:
        """The sample's targets placed in the input window (tensors, or lists for ragged data)."""

    @abstractmethod
    def loss(self, outputs: HeadOutput, batch: Batch) -> Tensor: ...

    @abstractmethod
    def meter(self) -> Meter: ...

    @abstractmethod
    def predictions(self, outputs: HeadOutput, batch: Batch) -> list[dict[str, Any]]:
        """Per image, JSON-friendly results in source coordinates (arrays for masks)."""

    @abstractmethod
    def to_config(self) -> dict[str, Any]:
        """Plain JSON that :meth:`from_config` turns back into an equal adapter."""

    @classmethod
    def from_config(cls, raw: dict[str, Any]) -> TaskAdapter:
        return cls(**raw)

    def default_steps(self, batch_size: int) -> int:
        """``visionfm finetune``'s least number of optimiser steps at ``batch_size`` inputs a step when the
        user does not say (``--min-steps``): ``default_min_steps``, whatever the batch."""
        return self.default_min_steps

    def default_lr_for(self, batch_size: int) -> float:
        """``visionfm finetune``'s peak learning rate at ``batch_size`` inputs a step when the user does not
        say (``--lr``): ``default_lr``, whatever the batch."""
        return self.default_lr

    def default_layer_decay(self, pretrained: bool) -> float:
        """Per-block learning-rate decay of the encoder when the user does not say
        (``visionfm finetune --layer-decay``). Layer decay protects a pretrained encoder's early,
        general features; 0.65 follows RETFound/VisionFM."""
        return 0.65

    def preprocess_defaults(self) -> dict[str, Any]:
        """Preprocessing settings this task trains best with (see :class:`~visionfm_core.tasks.data.Preprocess`)."""
        return {}

    def fit_to_data(self, samples: Sequence[TaskSample]) -> None:  # noqa: B027 - optional hook
        """Learn statistics from the training samples only (class weights, target scaling)."""

    def check(self, samples: Sequence[TaskSample]) -> None:  # noqa: B027 - optional hook
        """Raise DataError naming the first sample whose targets do not fit this task."""
