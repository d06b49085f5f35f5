"""Open a hospital's data wherever it is: a folder (nested images and DICOM files mixed, with an
optional labels.csv), a single DICOM or image file, or a MedMNIST-layout .npz.

Folders go through the persisted header index (index.py), so opening a site again only re-reads files
that changed. Multi-frame DICOM (OCT volumes, cine loops) becomes one item per selected frame.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from visionfm_core.data.confine import OUTSIDE_REASON, escapes
from visionfm_core.data.dicom_header import read_dicom_header
from visionfm_core.data.index import IndexEntry, SiteIndex, index_site, vendor_entry
from visionfm_core.data.items import ImageItem
from visionfm_core.data.labels import LabelRow, read_label_rows
from visionfm_core.data.patients import hash_patient_id, load_or_create_salt
from visionfm_core.data.problems import DataFileError, ProblemKind
from visionfm_core.data.sniff import FileType, sniff_file
from visionfm_core.data.sources import ScanResult, SkippedFile, load_npz_split
from visionfm_core.data.state import site_state_dir
from visionfm_core.errors import ConfigError, DataError
from visionfm_core.modalities import canonical_modality

LABELS_FILE = "labels.csv"
_EVERY = re.compile(r"^every[\s:_-]*(\d+)$")


def select_frames(frames: int, policy: str = "all") -> list[int]:
    """Frame indices of a volume under a slice policy: "all", "centre" (one middle B-scan), or
    "every:K" (every K-th, aligned so the centre frame is always included)."""
    if frames <= 0:
        return []
    key = policy.strip().lower()
    if key == "all":
        return list(range(frames))
    if key in ("centre", "center", "middle"):
        return [(frames - 1) // 2]
    match = _EVERY.match(key)
    if match and int(match.group(1)) >= 1:
        step = int(match.group(1))
        return list(range(((frames - 1) // 2) % step, frames, step))
    raise ConfigError("slices", f"unknown slice policy {policy!r}; use 'all', 'centre' or 'every:K'")


@dataclass(frozen=True)
class SiteOptions:
    """How a site's files become items: the site's modality (None: take it from DICOM tags), whether
    that modality overrides what the tags say, and which frames of a volume to use."""

    modality: str | None = None
    override_tags: bool = False
    slices: str = "all"


def _resolve_modality(entry: IndexEntry, options: SiteOptions) -> tuple[str | None, bool]:
    """(modality of the file's items, whether it contradicts the site's modality)."""
    if options.modality is None:
        return entry.modality, False
    if options.override_tags or entry.modality is None or entry.modality == options.modality:
        return options.modality, False
    return entry.modality, True


def _class_folder_layout(entries: list[IndexEntry]) -> bool:
    # Parent-folder names are labels only in the plain root/<class>/<file> layout; in a PACS export
    # (patient/study/series folders) they are identifiers, not classes.
    return bool(entries) and all(e.path.count("/") == 1 for e in entries)


def _items_for(
    entry: IndexEntry,
    source: str,
    label: int | None,
    patient_key: str | None,
    modality: str | None,
    slices: str,
) -> list[ImageItem]:
    if entry.kind == "dicom":
        return [
            ImageItem(source, label, modality, patient_key, frame, entry.laterality)
            for frame in select_frames(entry.frames, slices)
        ]
    return [ImageItem(source, label, modality, patient_key)]


def _vendor_items(entry: IndexEntry, source: str, label: int | None, options: SiteOptions) -> list[ImageItem]:
    """Every selected B-scan of an export as an OCT item and each fundus image as a fundus item,
    keeping those of the site's modality (all when the site names none)."""
    items: list[ImageItem] = []
    start = 0
    for count, eye, key in entry.volumes or []:
        items += [ImageItem(source, label, "oct", key, start + f, eye) for f in select_frames(count, options.slices)]
        start += count
    items += [ImageItem(source, label, "fundus", key, -(j + 1), eye) for j, (eye, key) in enumerate(entry.fundus or [])]
    return [i for i in items if options.modality is None or i.modality == options.modality]


def _vendor_mismatch(entry: IndexEntry, source: str, options: SiteOptions) -> SkippedFile:
    held = " and ".join(m for m, n in (("OCT B-scans", entry.frames), ("fundus images", len(entry.fundus or []))) if n)
    return SkippedFile(source, f"vendor OCT export holds {held}, the site is configured for {options.modality}",
                       ProblemKind.WRONG_MODALITY, entry.modality)


def items_from_index(
    index: SiteIndex, labels: dict[str, LabelRow] | None, salt: bytes, options: SiteOptions
) -> ScanResult:
    """Turn an index (plus optional labels) into items, skipped files and class names."""
    root = index.root
    skipped = [
        SkippedFile(
            str(root / e.path),
            e.reason or "unusable file",
            ProblemKind(e.problem) if e.problem else ProblemKind.OTHER,
        )
        for e in index.problems()
    ]
    usable = index.usable()
    if labels is not None:
        class_names = sorted({row.label for row in labels.values()})
        present = {e.path for e in index.entries.values()}
        skipped += [
            SkippedFile(str(root / rel), "listed in the labels CSV but not found", ProblemKind.FILE_NOT_FOUND)
            for rel in sorted(set(labels) - present)
        ]
    elif _class_folder_layout(usable):
        class_names = sorted({e.path.split("/")[0] for e in usable})
    else:
        class_names = []
    items: list[ImageItem] = []
    for entry in usable:
        source = str(root / entry.path)
        if entry.kind == "vendor_oct":
            vendor_label, row_key, missing = _label_of(entry, labels, class_names, salt)
            if missing:
                skipped.append(SkippedFile(source, "no row in the labels CSV", ProblemKind.NO_LABEL_ROW))
                continue
            vendor_items = _vendor_items(entry, source, vendor_label, options)
            if not vendor_items:
                skipped.append(_vendor_mismatch(entry, source, options))
            items.extend(replace(i, patient_key=row_key) if row_key else i for i in vendor_items)
            continue
        modality, wrong = _resolve_modality(entry, options)
        if wrong:
            skipped.append(
                SkippedFile(
                    source,
                    f"DICOM tags say {modality}, the site is configured for {options.modality}",
                    ProblemKind.WRONG_MODALITY,
                    modality,
                )
            )
            continue
        patient_key = entry.patient_key
        label: int | None = None
        if labels is not None:
            row = labels.get(entry.path)
            if row is None:
                skipped.append(SkippedFile(source, "no row in the labels CSV", ProblemKind.NO_LABEL_ROW))
                continue
            label = class_names.index(row.label)
            if row.patient_id:
                patient_key = hash_patient_id(row.patient_id, salt)
        elif class_names:
            label = class_names.index(entry.path.split("/")[0])
        items.extend(_items_for(entry, source, label, patient_key, modality, options.slices))
    return ScanResult(items=items, skipped=skipped, class_names=class_names)


def _label_of(
    entry: IndexEntry, labels: dict[str, LabelRow] | None, class_names: list[str], salt: bytes
) -> tuple[int | None, str | None, bool]:
    """(label, patient key from the labels CSV, whether the CSV lacks a row for the file)."""
    if labels is None:
        return (class_names.index(entry.path.split("/")[0]) if class_names else None), None, False
    row = labels.get(entry.path)
    if row is None:
        return None, None, True
    return class_names.index(row.label), hash_patient_id(row.patient_id, salt) if row.patient_id else None, False


def _single_file(path: Path, salt: bytes, options: SiteOptions) -> ScanResult:
    try:
        kind = sniff_file(path)
        if kind is FileType.DICOM:
            header = read_dicom_header(path, salt)
            entry = IndexEntry(
                path.name,
                0,
                0,
                "dicom",
                frames=header.frames,
                modality=header.modality,
                laterality=header.laterality,
                patient_key=header.patient_key,
            )
        elif kind is FileType.IMAGE:
            entry = IndexEntry(path.name, 0, 0, "image")
        elif kind is FileType.VENDOR_OCT:
            stat = path.stat()
            entry = vendor_entry(path, path.name, stat, salt)
        else:
            raise DataFileError(str(path), ProblemKind.NOT_AN_IMAGE,
                                "neither a supported image, DICOM nor a vendor OCT export")
    except DataError as exc:
        kind_of = exc.kind if isinstance(exc, DataFileError) else ProblemKind.OTHER
        return ScanResult(items=[], skipped=[SkippedFile(str(path), exc.reason, kind_of)])
    if entry.kind == "vendor_oct":
        vendor_items = _vendor_items(entry, str(path), None, options)
        if not vendor_items:
            return ScanResult(items=[], skipped=[_vendor_mismatch(entry, str(path), options)])
        return ScanResult(items=vendor_items)
    modality, wrong = _resolve_modality(entry, options)
    if wrong:
        return ScanResult(
            items=[],
            skipped=[
                SkippedFile(
                    str(path),
                    f"DICOM tags say {modality}, the site is configured for {options.modality}",
                    ProblemKind.WRONG_MODALITY,
                    modality,
                )
            ],
        )
    return ScanResult(items=_items_for(entry, str(path), None, entry.patient_key, modality, options.slices))


def scan_site(
    path: str | Path,
    options: SiteOptions,
    labels_csv: str | Path | None = None,
    split: str = "train",
    state_dir: str | Path | None = None,
) -> tuple[ScanResult, SiteIndex | None]:
    """`open_site`'s work, also returning the folder index (None for a single file or .npz)."""
    path = Path(path)
    if not path.exists():
        raise DataError(str(path), "data path not found")
    if path.is_file() and path.suffix.lower() == ".npz":
        return load_npz_split(path, split, options.modality), None
    state = site_state_dir(path if path.is_dir() else path.parent, state_dir)
    salt = load_or_create_salt(state)
    if path.is_file():
        return _single_file(path, salt, options), None
    index = index_site(path, state, salt)
    csv_path = Path(labels_csv) if labels_csv is not None else path / LABELS_FILE
    if labels_csv is None and csv_path.is_symlink() and escapes(path, LABELS_FILE):
        raise DataError(str(csv_path), OUTSIDE_REASON)
    labels = read_label_rows(csv_path) if labels_csv is not None or csv_path.is_file() else None
    return items_from_index(index, labels, salt, options), index


def open_site(
    path: str | Path,
    modality: str | None = None,
    *,
    labels_csv: str | Path | None = None,
    slices: str = "all",
    override_tags: bool = False,
    split: str = "train",
    state_dir: str | Path | None = None,
) -> ScanResult:
    """Open a site's data: a folder (images and DICOM mixed, nested; `labels.csv` in it is used
    automatically), one DICOM/image file, or a MedMNIST .npz (`split` picks the part).

    `modality` is the site's modality (any alias); DICOM files whose tags name another modality are
    skipped as wrong-modality unless `override_tags`. Without it, DICOM tags decide and plain images
    get None. `slices` selects frames of multi-frame files ("all", "centre", "every:K").
    `state_dir` holds the index and the patient-key salt (default: see state.py).
    """
    select_frames(1, slices)  # validate the policy before any work
    options = SiteOptions(None if modality is None else canonical_modality(modality), override_tags, slices)
    result, _ = scan_site(path, options, labels_csv, split, state_dir)
    return result
