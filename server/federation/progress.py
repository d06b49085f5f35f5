"""Live console progress of a federation: round, sites answered, loss, probe score (rich)."""

from __future__ import annotations

import math
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


class RoundProgress:
    """A progress bar over rounds whose description shows the latest sites, loss and probe score."""

    def __init__(self, num_rounds: int, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.num_rounds = num_rounds
        self.round = 0
        self.sites: list[str] = []
        self.losses: list[float] = []
        self.scores: dict[str, float] = {}
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        if enabled:
            self._progress = Progress(TextColumn("[bold]federation"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.description}"), TimeElapsedColumn(),
                                      console=console or Console(stderr=True))

    def __enter__(self) -> RoundProgress:
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task("starting", total=self.num_rounds)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    def _refresh(self, advance: int = 0) -> None:
        if self._progress is None or self._task is None:
            return
        loss = [x for x in self.losses if not math.isnan(x)]
        parts = [f"round {self.round}", f"sites answered {len(self.sites)}"]
        if loss:
            parts.append(f"loss {sum(loss) / len(loss):.3f}")
        parts += [f"{m} k-NN acc {v:.3f}" for m, v in sorted(self.scores.items())]
        self._progress.update(self._task, description=" · ".join(parts), advance=advance)

    def start_round(self, server_round: int) -> None:
        if server_round > 1:
            self._refresh(advance=1)
        self.round, self.sites, self.losses = server_round, [], []
        self._refresh()

    def site_done(self, site: str, loss: float) -> None:
        self.sites.append(site)
        self.losses.append(loss)
        self._refresh()

    def score(self, modality: str, value: float) -> None:
        self.scores[modality] = value
        self._refresh(advance=1 if self.round == self.num_rounds else 0)
