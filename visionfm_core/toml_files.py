"""Reading a TOML file that a user wrote (a job, a participants list), with errors that name it."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from visionfm_core.errors import ConfigError


def read_toml(path: str | Path, field: str) -> dict[str, Any]:
    """The file's top-level table; a missing or malformed file raises ConfigError(field, ...) naming it."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(field, f"file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(field, f"{path} is not valid TOML ({exc})") from exc
