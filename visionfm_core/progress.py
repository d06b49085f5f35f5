"""Progress of the single-site commands (pretrain, finetune, evaluate, predict).

On a terminal: a rich progress bar per phase. Otherwise (a log file, CI, a batch job): one plain line
per epoch (loss, validation score, time) and one at the end of each phase, so a log shows where a
long run is without a bar's control characters. Trainers call a `ProgressReporter` through
`advance` / `epoch` only; `NO_PROGRESS` is the silent default of library code.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@dataclass(frozen=True)
class EpochLine:
    """What one finished epoch (or pretraining stretch) reports."""

    epoch: int
    epochs: int
    loss: float
    seconds: float
    metric: str | None = None
    score: float | None = None
    unit: str = "epoch"

    def text(self) -> str:
        parts = [f"{self.unit} {self.epoch}/{self.epochs}", f"loss {self.loss:.4f}"]
        if self.metric is not None and self.score is not None:
            parts.append(f"validation {self.metric} {_number(self.score)}")
        parts.append(f"{self.seconds:.1f} s")
        return ", ".join(parts)


def _number(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


class ProgressReporter:
    """Silent base: every hook does nothing. Phases: "train", "evaluate", "predict", "pretrain"."""

    def start(self, phase: str, total: int, description: str) -> None:
        """A phase of `total` steps (batches) begins."""

    def advance(self, phase: str, steps: int = 1) -> None:
        """`steps` more of `phase` are done (ignored unless `phase` is the one started)."""

    def epoch(self, line: EpochLine) -> None:
        """An epoch finished."""

    def finish(self, phase: str, summary: str) -> None:
        """The phase ended; `summary` is one line (images, time)."""


NO_PROGRESS = ProgressReporter()


class PlainProgress(ProgressReporter):
    """One line per epoch and per finished phase, nothing per batch."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._started: dict[str, float] = {}

    def start(self, phase: str, total: int, description: str) -> None:
        self._started[phase] = time.perf_counter()
        self.console.print(f"{description} ({total} batches)", markup=False, highlight=False)

    def epoch(self, line: EpochLine) -> None:
        self.console.print(line.text(), markup=False, highlight=False)

    def finish(self, phase: str, summary: str) -> None:
        seconds = time.perf_counter() - self._started.pop(phase, time.perf_counter())
        self.console.print(f"{summary} in {seconds:.1f} s", markup=False, highlight=False)


class RichProgress(PlainProgress):
    """A live bar per phase on a terminal; epoch and summary lines are printed above it."""

    def __init__(self, console: Console) -> None:
        super().__init__(console)
        self._bars: dict[str, tuple[Progress, TaskID]] = {}

    def start(self, phase: str, total: int, description: str) -> None:
        self._started[phase] = time.perf_counter()
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TimeRemainingColumn(), console=self.console, transient=True)
        task = bar.add_task(description, total=max(1, total))
        bar.start()
        self._bars[phase] = (bar, task)

    def advance(self, phase: str, steps: int = 1) -> None:
        if phase in self._bars:
            bar, task = self._bars[phase]
            bar.advance(task, steps)

    def finish(self, phase: str, summary: str) -> None:
        if phase in self._bars:
            bar, _ = self._bars.pop(phase)
            bar.stop()
        super().finish(phase, summary)


def console_progress(console: Console) -> ProgressReporter:
    """Bars on an interactive terminal, plain lines otherwise."""
    return RichProgress(console) if console.is_terminal else PlainProgress(console)


def name_skipped(console: Console, skipped: Iterable[tuple[str, str]]) -> int:
    """Print every skipped file with its reason, whole (never wrapped or cut); returns how many."""
    count = 0
    for path, reason in skipped:
        console.print(f"skipped {path}: {reason}", markup=False, highlight=False, soft_wrap=True)
        count += 1
    if count:
        console.print(f"{count} file(s) skipped (named above)", markup=False, highlight=False)
    return count
