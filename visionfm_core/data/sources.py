"""Find a site's images: nested image folders with an optional labels CSV, and MedMNIST .npz files.

Scanning never stops on a bad file: each one is listed in `ScanResult.skipped` with its reason.
`open_site` (site.py) is the entry point for a hospital folder; these are the simpler building blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visionfm_core.data.items import ImageItem, items_from_arrays
from visionfm_core.data.labels import LabelRow, read_label_rows
from visionfm_core.data.npz import npz_keys, read_npz_array
from visionfm_core.data.patients import hash_patient_id, load_or_create_salt
from visionfm_core.data.problems import DataFileError, ProblemKind
from visionfm_core.data.readers import IMAGE_SUFFIXES
from visionfm_core.data.sniff import SIDECAR_SUFFIXES
from visionfm_core.data.state import site_state_dir
from visionfm_core.errors import DataError


@dataclass
class SkippedFile:
    """A file left out of the data, with a one-line reason (local only) and its category (countable
    in public reports). `found_modality` is set for files of another modality than the site's."""

    path: str
    reason: str
    kind: ProblemKind = ProblemKind.OTHER
    found_modality: str | None = None


@dataclass
class ScanResult:
    """The usable items of a source, the files skipped, and the label names (index = class id)."""

    items: list[ImageItem]
    skipped: list[SkippedFile] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)


def read_labels_csv(csv_path: Path) -> tuple[dict[str, tuple[str, str | None]], str]:
    """Map relative image path -> (label, raw patient id) from a CSV with columns path,label[,patient_id].
    Kept for older callers; new code uses `labels.read_label_rows`."""
    rows = read_label_rows(csv_path)
    return {rel: (row.label, row.patient_id) for rel, row in rows.items()}, "path"


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def scan_image_folder(
    root: str | Path,
    labels_csv: str | Path | None = None,
    modality: str | None = None,
    salt: bytes | None = None,
) -> ScanResult:
    """Items for every image file below `root` (nested; DICOM is handled by `open_site`). Labels come
    from `labels_csv` when given, otherwise from the immediate parent folder name when images sit in
    class folders. Patient IDs from the CSV are hashed with `salt` (default: the site's own salt)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(str(root), "data folder not found or not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not _is_hidden(p.relative_to(root)))
    skipped: list[SkippedFile] = []
    labels: dict[str, LabelRow] | None = None
    if labels_csv is not None:
        labels = read_label_rows(labels_csv)
        if salt is None and any(row.patient_id for row in labels.values()):
            salt = load_or_create_salt(site_state_dir(root))
    entries: list[tuple[Path, str | None, str | None]] = []
    for path in files:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            if path.suffix.lower() not in SIDECAR_SUFFIXES:
                skipped.append(SkippedFile(str(path), "not an image file type", ProblemKind.NOT_AN_IMAGE))
            continue
        if path.stat().st_size == 0:
            skipped.append(SkippedFile(str(path), "empty file (0 bytes)", ProblemKind.EMPTY))
            continue
        rel = path.relative_to(root).as_posix()
        if labels is not None:
            row = labels.get(rel)
            if row is None:
                skipped.append(SkippedFile(str(path), "no row in the labels CSV", ProblemKind.NO_LABEL_ROW))
                continue
            key = hash_patient_id(row.patient_id, salt) if row.patient_id and salt is not None else None
            entries.append((path, row.label, key))
        else:
            entries.append((path, path.parent.name if path.parent != root else None, None))
    # Class ids index the sorted names so every site agrees on them; with a CSV every label it names
    # counts, even one whose files are all missing here.
    if labels is not None:
        class_names = sorted({row.label for row in labels.values()})
    else:
        class_names = sorted({label for _, label, _ in entries if label is not None})
    items = [
        ImageItem(str(path), None if label is None else class_names.index(label), modality, key)
        for path, label, key in entries
    ]
    return ScanResult(items=items, skipped=skipped, class_names=class_names)


NPZ_SPLITS: Sequence[str] = ("train", "val", "test")


def load_npz_split(path: str | Path, split: str, modality: str | None = None) -> ScanResult:
    """Items of one split of a MedMNIST-layout .npz (`{split}_images`, `{split}_labels`)."""
    path = Path(path)
    keys = npz_keys(path)
    if f"{split}_images" not in keys:
        raise DataFileError(
            str(path), ProblemKind.OTHER, f"no '{split}_images' array (MedMNIST layout expected)"
        )
    images = read_npz_array(path, f"{split}_images")
    labels = read_npz_array(path, f"{split}_labels") if f"{split}_labels" in keys else None
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or min(images.shape, default=0) == 0:
        raise DataFileError(
            str(path),
            ProblemKind.UNSUPPORTED_PIXEL_FORMAT,
            f"{split}_images must be non-empty uint8 (N,H,W[,C]), got {images.dtype} {images.shape}",
        )
    if images.ndim == 4 and images.shape[3] not in (1, 3, 4):
        raise DataFileError(
            str(path), ProblemKind.UNSUPPORTED_PIXEL_FORMAT, f"{split}_images has {images.shape[3]} channels"
        )
    if labels is not None and (
        labels.size == 0
        or len(labels) != len(images)
        or labels.dtype.kind not in "iub"
        or int(np.asarray(labels).min()) < 0
    ):
        raise DataFileError(
            str(path),
            ProblemKind.OTHER,
            f"{split}_labels must hold one non-negative integer per image, got {labels.dtype} {labels.shape}",
        )
    items = items_from_arrays(images, labels, name=f"{path.name}:{split}", modality=modality)
    n_classes = 0 if labels is None else int(np.asarray(labels).max()) + 1
    return ScanResult(items=items, class_names=[str(i) for i in range(n_classes)])
