"""Why a file was left out: a fixed set of problem kinds plus the error that carries one.

The kind is a short category that may leave the site (counts per kind in the preflight report); the
free-text reason and the path stay on the site.
"""

from __future__ import annotations

from enum import Enum

from visionfm_core.errors import DataError


class ProblemKind(str, Enum):
    """Categories of unusable files; the values are stable names used in public reports."""

    EMPTY = "empty_file"
    TRUNCATED = "truncated"
    NOT_AN_IMAGE = "not_an_image"
    CORRUPT = "corrupt"
    TOO_LARGE = "too_large"
    MISSING_PIXEL_DATA = "missing_pixel_data"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
    MISSING_CODEC = "missing_codec"
    UNSUPPORTED_PIXEL_FORMAT = "unsupported_pixel_format"
    WRONG_MODALITY = "wrong_modality"
    NO_LABEL_ROW = "no_label_row"
    FILE_NOT_FOUND = "file_not_found"
    OUTSIDE_DATA_FOLDER = "outside_data_folder"
    OTHER = "other"


class DataFileError(DataError):
    """A DataError with a category: `path` and `reason` stay local, `kind` may be counted publicly."""

    def __init__(self, path: str, kind: ProblemKind, reason: str) -> None:
        super().__init__(path, reason)
        self.kind = kind


def problem_kind(error: DataError) -> ProblemKind:
    """The category of any DataError (plain DataErrors from older code count as OTHER)."""
    return error.kind if isinstance(error, DataFileError) else ProblemKind.OTHER
