"""Shared pieces of the single-site commands: error reporting, JSON output, option parsing."""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import typer
from rich.console import Console

from visionfm_core.errors import VisionFMError

console = Console(stderr=True, soft_wrap=True)  # never wrap or cut a line: paths stay whole
P = ParamSpec("P")
R = TypeVar("R")


def reports_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn a VisionFMError (bad file, key or setting) into one red line and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        try:
            return command(*args, **kwargs)
        except VisionFMError as exc:
            console.print(f"[red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from exc

    return wrapper


def clean_numbers(value: Any) -> Any:
    """nan/inf -> None so the result is valid JSON; recurses into dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean_numbers(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_numbers(v) for v in value]
    return value


def emit_json(payload: Any, out: Path | None = None) -> None:
    """Write ``payload`` as JSON to ``out`` or to standard output."""
    text = json.dumps(clean_numbers(payload), indent=2, sort_keys=True)
    if out is None:
        typer.echo(text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n", encoding="utf-8")
        console.print(f"wrote {out}")


def split_names(raw: str | None) -> list[str]:
    """``"a,b , c"`` -> ``["a", "b", "c"]``; None or empty -> []."""
    return [part.strip() for part in (raw or "").split(",") if part.strip()]
