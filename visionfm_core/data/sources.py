"""Find a site's images: nested image folders with an optional labels CSV, and MedMNIST .npz files.

Scanning never stops on a bad file: each one is listed in `ScanResult.skipped` with its reason.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visionfm_core.data.items import ImageItem, items_from_arrays
from visionfm_core.data.readers import IMAGE_SUFFIXES
from visionfm_core.errors import DataError


@dataclass
class SkippedFile:
    """A file left out of the data, with a one-line reason."""

    path: str
    reason: str


@dataclass
class ScanResult:
    """The usable items of a source, the files skipped, and the label names (index = class id)."""

    items: list[ImageItem]
    skipped: list[SkippedFile] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)


def _label_index(raw: str, class_names: list[str]) -> int:
    if raw not in class_names:
        class_names.append(raw)
    return class_names.index(raw)


def read_labels_csv(csv_path: Path) -> tuple[dict[str, tuple[str, str | None]], str]:
    """Map relative image path -> (label, patient id) from a CSV with columns path,label[,patient_id]."""
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        path_key = next((k for k in ("path", "image", "file", "filename") if k in fields), None)
        label_key = next((k for k in ("label", "category", "class", "grade") if k in fields), None)
        if path_key is None or label_key is None:
            raise DataError(str(csv_path), f"needs a path and a label column, found {fields}")
        rows = {row[path_key]: (row[label_key], row.get("patient_id") or None) for row in reader}
    return rows, path_key


def scan_image_folder(
    root: str | Path, labels_csv: str | Path | None = None, modality: str | None = None
) -> ScanResult:
    """Items for every image below `root` (nested). Labels come from `labels_csv` when given,
    otherwise from the immediate parent folder name when images sit in class folders."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(str(root), "data folder not found or not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    skipped: list[SkippedFile] = []
    class_names: list[str] = []
    labels: dict[str, tuple[str, str | None]] | None = None
    if labels_csv is not None:
        labels, _ = read_labels_csv(Path(labels_csv))
        class_names = sorted({label for label, _ in labels.values()})
    items: list[ImageItem] = []
    for path in files:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            if path.suffix.lower() not in {".csv", ".txt", ".json", ".md", ".toml"}:
                skipped.append(SkippedFile(str(path), "not an image file type"))
            continue
        if path.stat().st_size == 0:
            skipped.append(SkippedFile(str(path), "empty file (0 bytes)"))
            continue
        rel = path.relative_to(root).as_posix()
        label: int | None = None
        patient: str | None = None
        if labels is not None:
            if rel not in labels:
                skipped.append(SkippedFile(str(path), "no row in the labels CSV"))
                continue
            raw, patient = labels[rel]
            label = _label_index(raw, class_names)
        elif path.parent != root:
            label = _label_index(path.parent.name, class_names)
        items.append(ImageItem(source=str(path), label=label, modality=modality, patient_key=patient))
    if labels is None and class_names:
        # Folder-derived classes: index by sorted name so every site agrees on class ids.
        order = sorted(class_names)
        items = [
            ImageItem(i.source, order.index(class_names[i.label]) if i.label is not None else None,
                      i.modality, i.patient_key)
            for i in items
        ]
        class_names = order
    return ScanResult(items=items, skipped=skipped, class_names=class_names)


NPZ_SPLITS: Sequence[str] = ("train", "val", "test")


def load_npz_split(path: str | Path, split: str, modality: str | None = None) -> ScanResult:
    """Items of one split of a MedMNIST-layout .npz (`{split}_images`, `{split}_labels`)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            images = data[f"{split}_images"]
            labels = data[f"{split}_labels"] if f"{split}_labels" in data else None
    except FileNotFoundError as exc:
        raise DataError(str(path), "file not found") from exc
    except KeyError as exc:
        raise DataError(str(path), f"no '{split}_images' array (MedMNIST layout expected)") from exc
    except (OSError, ValueError) as exc:
        raise DataError(str(path), f"not a readable .npz file ({exc})") from exc
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataError(str(path), f"{split}_images must be uint8 (N,H,W[,C]), got {images.dtype} {images.shape}")
    items = items_from_arrays(images, labels, name=f"{path.name}:{split}", modality=modality)
    n_classes = 0 if labels is None else int(np.asarray(labels).max()) + 1
    return ScanResult(items=items, class_names=[str(i) for i in range(n_classes)])
