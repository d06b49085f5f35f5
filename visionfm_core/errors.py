"""Typed errors that name the file, field or key at fault. Library code raises; entry points report."""

from __future__ import annotations


class VisionFMError(Exception):
    """Base class of every error visionfm-fed raises on purpose."""


class ConfigError(VisionFMError, ValueError):
    """A configuration value is missing or invalid; the message names the key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config '{key}': {message}")
        self.key = key


class UnknownModalityError(ConfigError):
    """A modality name that is neither canonical nor a known alias."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__("modality", f"unknown modality {name!r}; known: {', '.join(known)}")
        self.name = name


class DataError(VisionFMError):
    """A data file cannot be used; `path` names it, `reason` says why in one line."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class CheckpointError(VisionFMError):
    """A checkpoint file is missing, malformed or does not fit the model."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
