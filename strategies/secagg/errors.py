"""Errors of the secure aggregation protocol: a clean abort, or a message that breaks the protocol."""

from __future__ import annotations

from visionfm_core.errors import VisionFMError


class SecAggAbort(VisionFMError):  # noqa: N818 (the issue's name for a clean abort, not a bug)
    """Too few participants remain for the round to finish safely; the round must be dropped.

    `stage` names the protocol stage, `needed` and `got` the counts that fell short, `group` the
    modality group whose secure sum was abandoned (other groups may still finish).
    """

    def __init__(self, group: str, stage: str, needed: int, got: int, detail: str = "") -> None:
        message = f"secure aggregation of '{group}' aborted at stage '{stage}': needed {needed}, got {got}"
        super().__init__(message + (f" ({detail})" if detail else ""))
        self.group = group
        self.stage = stage
        self.needed = needed
        self.got = got


class SecAggProtocolError(VisionFMError):
    """A message does not fit the protocol (wrong stage, malformed field, inconsistent request).

    Raised on the side that received the message; `field` names the offending field.
    """

    def __init__(self, group: str, stage: str, field: str, reason: str) -> None:
        super().__init__(f"secure aggregation of '{group}', stage '{stage}', field '{field}': {reason}")
        self.group = group
        self.stage = stage
        self.field = field
