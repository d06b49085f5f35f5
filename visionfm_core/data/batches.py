"""Endless batches from a loader: pass after pass, for training loops counted in steps, not epochs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from visionfm_core.errors import DataError

B = TypeVar("B")


def cycle_batches(loader: Iterable[B], what: str = "the data loader") -> Iterator[B]:
    """Batches of `loader`, pass after pass (each pass a fresh iteration, so a shuffling loader
    reshuffles), without end. A pass that yields nothing raises DataError instead of looping for ever."""
    while True:
        produced = False
        for batch in loader:
            produced = True
            yield batch
        if not produced:
            raise DataError("<loader>", f"{what} yielded no batch (empty, or a used-up iterator)")
