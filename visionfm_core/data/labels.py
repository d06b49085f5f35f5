"""Label files: a CSV with a path column, a label column and an optional patient-ID column."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from visionfm_core.data.problems import DataFileError, ProblemKind

PATH_COLUMNS = ("path", "image", "file", "filename")
LABEL_COLUMNS = ("label", "category", "class", "grade")
PATIENT_COLUMNS = ("patient_id", "patient", "patientid", "patient id")
# A labels file this large is not a labels file; refuse before reading it into memory.
MAX_LABELS_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class LabelRow:
    """One CSV row: the label text and the raw patient ID (hash it before it goes anywhere)."""

    label: str
    patient_id: str | None


def normalise_rel_path(raw: str) -> str:
    """'./a\\b.jpg' and 'a/b.jpg' name the same file: POSIX separators, no leading './'."""
    cleaned = raw.strip().replace("\\", "/")
    return PurePosixPath(cleaned).as_posix() if cleaned else ""


def _pick(fields: list[str], candidates: tuple[str, ...]) -> str | None:
    lowered = {f.strip().lower(): f for f in fields}
    return next((lowered[c] for c in candidates if c in lowered), None)


def read_label_rows(csv_path: str | Path) -> dict[str, LabelRow]:
    """Map relative image path -> LabelRow; raises DataFileError naming the CSV when it is unusable."""
    csv_path = Path(csv_path)
    name = str(csv_path)
    try:
        if csv_path.stat().st_size > MAX_LABELS_BYTES:
            raise DataFileError(name, ProblemKind.TOO_LARGE, "labels CSV larger than 256 MiB")
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = list(reader.fieldnames or [])
            path_key, label_key = _pick(fields, PATH_COLUMNS), _pick(fields, LABEL_COLUMNS)
            patient_key = _pick(fields, PATIENT_COLUMNS)
            if path_key is None or label_key is None:
                raise DataFileError(
                    name, ProblemKind.OTHER, f"labels CSV needs a path and a label column, found {fields}"
                )
            rows: dict[str, LabelRow] = {}
            for line, row in enumerate(reader, start=2):
                rel = normalise_rel_path(row.get(path_key) or "")
                label = (row.get(label_key) or "").strip()
                if not rel or not label:
                    raise DataFileError(name, ProblemKind.OTHER, f"line {line}: empty path or label")
                patient = (row.get(patient_key) or "").strip() if patient_key else ""
                rows[rel] = LabelRow(label, patient or None)
    except DataFileError:
        raise
    except FileNotFoundError as exc:
        raise DataFileError(name, ProblemKind.FILE_NOT_FOUND, "labels CSV not found") from exc
    except UnicodeDecodeError as exc:
        raise DataFileError(name, ProblemKind.OTHER, "labels CSV is not UTF-8 text") from exc
    except (csv.Error, OSError, ValueError) as exc:
        raise DataFileError(name, ProblemKind.OTHER, f"unreadable labels CSV ({type(exc).__name__})") from exc
    return rows
