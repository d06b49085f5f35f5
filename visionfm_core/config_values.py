"""Parsing of single config values as they arrive from TOML, Flower's run/node config or the command
line (numbers as strings, "true"/"false", "none"). One set of rules for every config reader; each
raises ValueError or TypeError and the caller turns it into a ConfigError that names its key."""

from __future__ import annotations

from typing import Any

TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")
UNSET_WORDS = ("", "none", "auto")


def parse_bool(value: Any) -> bool:
    """true/false/1/0/yes/no (any case) or a bool/int."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word not in TRUE_WORDS + FALSE_WORDS:
            raise ValueError(value)
        return word in TRUE_WORDS
    if not isinstance(value, (bool, int)):
        raise TypeError(value)
    return bool(value)


def parse_int(value: Any) -> int:
    """An integer; a float only when it is whole; never a bool."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(value)
    return int(value)


def parse_float(value: Any) -> float:
    """A number (or its string); never a bool."""
    if isinstance(value, bool):
        raise TypeError(value)
    return float(value)


def is_unset(value: Any) -> bool:
    """None, or a word that means "not set" ("", "none", "auto")."""
    return value is None or (isinstance(value, str) and value.strip().lower() in UNSET_WORDS)
