"""The error certs raises: it names the file at fault and says why in one line."""

from __future__ import annotations

from visionfm_core.errors import VisionFMError


class CertificateError(VisionFMError):
    """A certificate or key file is missing, malformed or does not belong where it is."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
