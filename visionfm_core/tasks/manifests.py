"""Read a site's downstream data into `TaskSample`s: CSV manifests, class folders, MedMNIST .npz.

Manifest CSVs (paths relative to the CSV's folder; one image per row unless noted):

- classification: ``image,label[,patient_id]``; multi-label: ``image,labels`` with names joined by ``|``
- segmentation:   ``image,mask[,fov]``
- landmarks:      ``image,<point>_x,<point>_y,...`` (empty cell = point missing)
- detection:      ``image,x0,y0,x1,y1,label``, one row per box (empty box cells = no box in that image)
- regression:     ``image,<target>,...`` (empty cell = unknown)

Errors name the CSV, the row and the column at fault.

A manifest is input like any other: the files it names are checked (`task_file_problems`) before
anything is decoded: each must lie inside the site's data folder or the manifest's own folder
(symbolic links and `..` resolved) and be an image (DICOM allowed for the image column).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from visionfm_core.data.confine import is_inside
from visionfm_core.data.items import ImageItem
from visionfm_core.data.sniff import FileType, sniff_file
from visionfm_core.data.sources import load_npz_split, scan_image_folder
from visionfm_core.errors import DataError
from visionfm_core.tasks.samples import TaskSample, relative_to

IMAGE_COLUMNS = ("image", "path", "file", "filename")


@dataclass
class Manifest:
    """Samples plus the names behind their ids (classes, points or targets)."""

    samples: list[TaskSample]
    names: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of files left out


def _rows(csv_path: Path) -> tuple[list[dict[str, str]], str]:
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            fields = reader.fieldnames or []
    except FileNotFoundError as exc:
        raise DataError(str(csv_path), "manifest not found") from exc
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(str(csv_path), f"not a readable CSV ({exc})") from exc
    image_column = next((c for c in IMAGE_COLUMNS if c in fields), None)
    if image_column is None:
        raise DataError(str(csv_path), f"needs an image column ({'/'.join(IMAGE_COLUMNS)}); found {fields}")
    return rows, image_column


def _require(csv_path: Path, rows: list[dict[str, str]], columns: Sequence[str]) -> None:
    present = set(rows[0]) if rows else set()
    missing = [c for c in columns if c not in present]
    if rows and missing:
        raise DataError(str(csv_path), f"missing column(s) {', '.join(missing)}")


def _float(csv_path: Path, row: int, column: str, raw: str | None) -> float:
    if raw is None or raw.strip() == "":
        return float("nan")
    try:
        return float(raw)
    except ValueError as exc:
        raise DataError(str(csv_path), f"row {row}, column '{column}': {raw!r} is not a number") from exc


def _item(base: Path, raw: str, modality: str | None, patient: str | None = None) -> ImageItem:
    return ImageItem(source=relative_to(base, raw), modality=modality, patient_key=patient or None)


def class_ids(labels: Sequence[str], class_names: Sequence[str] | None) -> tuple[list[str], dict[str, int]]:
    """Names and the name -> id map: given names win; all-integer labels are ids; else sorted names."""
    if class_names:
        names = list(class_names)
    elif labels and all(label.strip().lstrip("-").isdigit() for label in labels):
        names = [str(i) for i in range(max(int(label) for label in labels) + 1)]
    else:
        names = sorted(set(labels))
    return names, {name: i for i, name in enumerate(names)}


def read_classification_csv(
    csv_path: str | Path,
    class_names: Sequence[str] | None = None,
    multilabel: bool = False,
    modality: str | None = None,
) -> Manifest:
    path = Path(csv_path)
    rows, image_column = _rows(path)
    label_column = "labels" if multilabel else "label"
    _require(path, rows, [label_column])
    raw_labels = [r[label_column].strip() for r in rows]
    if multilabel:
        every = sorted({part.strip() for raw in raw_labels for part in raw.split("|") if part.strip()})
        names = list(class_names) if class_names else every
        index = {n: i for i, n in enumerate(names)}
    else:
        names, index = class_ids(raw_labels, class_names)
    samples: list[TaskSample] = []
    for number, (row, raw) in enumerate(zip(rows, raw_labels, strict=True), start=2):
        item = _item(path.parent, row[image_column], modality, row.get("patient_id"))
        if multilabel:
            chosen = [part.strip() for part in raw.split("|") if part.strip()]
            unknown = [c for c in chosen if c not in index]
            if unknown:
                raise DataError(str(path), f"row {number}, column 'labels': unknown class {unknown[0]!r}")
            indicator = tuple(int(name in chosen) for name in names)
            samples.append(TaskSample(item, labels=indicator))
        else:
            if raw not in index:
                raise DataError(str(path), f"row {number}, column 'label': {raw!r} is not one of {names}")
            samples.append(TaskSample(item, label=index[raw]))
    return Manifest(samples, names)


def read_segmentation_csv(csv_path: str | Path, modality: str | None = None) -> Manifest:
    path = Path(csv_path)
    rows, image_column = _rows(path)
    _require(path, rows, ["mask"])
    samples = []
    for number, row in enumerate(rows, start=2):
        if not row["mask"].strip():
            raise DataError(str(path), f"row {number}, column 'mask': empty (every image needs a mask)")
        fov = (row.get("fov") or "").strip()
        samples.append(
            TaskSample(
                _item(path.parent, row[image_column], modality, row.get("patient_id")),
                mask=relative_to(path.parent, row["mask"].strip()),
                fov=relative_to(path.parent, fov) if fov else None,
            )
        )
    return Manifest(samples)


def read_landmark_csv(
    csv_path: str | Path, point_names: Sequence[str] | None = None, modality: str | None = None
) -> Manifest:
    path = Path(csv_path)
    rows, image_column = _rows(path)
    columns = list(rows[0]) if rows else []
    names = (
        list(point_names) if point_names else [c[:-2] for c in columns if c.endswith("_x") and f"{c[:-2]}_y" in columns]
    )
    if not names:
        raise DataError(str(path), "no landmark columns (<name>_x and <name>_y)")
    _require(path, rows, [f"{n}_{axis}" for n in names for axis in "xy"])
    samples = []
    for number, row in enumerate(rows, start=2):
        points = tuple(
            (_float(path, number, f"{n}_x", row[f"{n}_x"]), _float(path, number, f"{n}_y", row[f"{n}_y"]))
            for n in names
        )
        samples.append(
            TaskSample(_item(path.parent, row[image_column], modality, row.get("patient_id")), points=points)
        )
    return Manifest(samples, names)


def read_detection_csv(
    csv_path: str | Path, class_names: Sequence[str] | None = None, modality: str | None = None
) -> Manifest:
    path = Path(csv_path)
    rows, image_column = _rows(path)
    _require(path, rows, ["x0", "y0", "x1", "y1", "label"])
    names, index = class_ids([r["label"].strip() for r in rows if r["label"].strip()], class_names)
    boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    labels: dict[str, list[int]] = {}
    patients: dict[str, str | None] = {}
    for number, row in enumerate(rows, start=2):
        image = row[image_column]
        boxes.setdefault(image, [])
        labels.setdefault(image, [])
        patients[image] = row.get("patient_id")
        if not row["label"].strip():
            continue
        box = tuple(_float(path, number, c, row[c]) for c in ("x0", "y0", "x1", "y1"))
        if not (box[2] > box[0] and box[3] > box[1]):
            raise DataError(str(path), f"row {number}: box {box} is empty (need x0 < x1 and y0 < y1)")
        if row["label"].strip() not in index:
            raise DataError(str(path), f"row {number}, column 'label': unknown class {row['label']!r}")
        boxes[image].append(box)  # type: ignore[arg-type]
        labels[image].append(index[row["label"].strip()])
    samples = [
        TaskSample(
            _item(path.parent, image, modality, patients[image]),
            boxes=tuple(boxes[image]),
            box_labels=tuple(labels[image]),
        )
        for image in boxes
    ]
    return Manifest(samples, names)


def read_regression_csv(csv_path: str | Path, target_names: Sequence[str], modality: str | None = None) -> Manifest:
    path = Path(csv_path)
    rows, image_column = _rows(path)
    if not target_names:
        target_names = [c for c in (rows[0] if rows else {}) if c not in (*IMAGE_COLUMNS, "patient_id")]
    _require(path, rows, list(target_names))
    samples = [
        TaskSample(
            _item(path.parent, row[image_column], modality, row.get("patient_id")),
            values=tuple(_float(path, number, t, row[t]) for t in target_names),
        )
        for number, row in enumerate(rows, start=2)
    ]
    return Manifest(samples, list(target_names))


def classification_source(
    source: str | Path,
    split: str | None = None,
    class_names: Sequence[str] | None = None,
    modality: str | None = None,
    multilabel: bool = False,
) -> Manifest:
    """Classification samples from a manifest CSV, a folder of class folders, or a MedMNIST .npz split."""
    path = Path(source)
    if path.suffix == ".npz":
        scan = load_npz_split(path, split or "train", modality)
        names = list(class_names) if class_names else scan.class_names
        return Manifest([TaskSample(i, label=i.label) for i in scan.items], names)
    if path.suffix == ".csv":
        return read_classification_csv(path, class_names, multilabel, modality)
    scan = scan_image_folder(path, modality=modality)
    skipped = [(s.path, s.reason) for s in scan.skipped]
    if not scan.class_names:
        raise DataError(str(path), "no class folders (expected <class>/<image> below the folder)")
    names = scan.class_names
    if class_names:
        missing = [n for n in names if n not in class_names]
        if missing:
            raise DataError(str(path), f"class folder {missing[0]!r} is not one of {list(class_names)}")
        remap = {i: list(class_names).index(n) for i, n in enumerate(names)}
        names = list(class_names)
        return Manifest(
            [TaskSample(i, label=remap[i.label] if i.label is not None else None) for i in scan.items], names,
            skipped,
        )
    return Manifest([TaskSample(i, label=i.label) for i in scan.items], names, skipped)


def _file_problem(path: str, roots: Sequence[str | Path], allowed: tuple[FileType, ...]) -> str | None:
    if not is_inside(path, roots):
        return "outside the data folder and the manifest's folder (symbolic links and '..' resolved): refused"
    if not Path(path).is_file():
        return "does not exist"
    try:
        kind = sniff_file(path)
    except OSError as exc:
        return f"cannot be read ({type(exc).__name__})"
    if kind not in allowed:
        return "is not an image" if FileType.DICOM not in allowed else "is neither an image nor DICOM"
    return None


def task_file_problems(samples: Sequence[TaskSample], roots: Sequence[str | Path]) -> list[str]:
    """'<path>: <what is wrong>' for every image, mask or field-of-view file of `samples` that lies
    outside `roots`, is missing, or is not an image (a DICOM file is fine as the image, not as a
    mask). Files outside `roots` are never opened. The lines name files: they stay on the site."""
    problems: dict[str, str] = {}
    for sample in samples:
        files = ((sample.source, (FileType.IMAGE, FileType.DICOM)), (sample.mask, (FileType.IMAGE,)),
                 (sample.fov, (FileType.IMAGE,)))
        for path, allowed in files:
            if isinstance(path, str) and path not in problems:
                problem = _file_problem(path, roots, allowed)
                if problem is not None:
                    problems[path] = problem
    return [f"{path}: {reason}" for path, reason in problems.items()]


def manifest_roots(manifest: str | Path, data_path: str | Path | None) -> list[Path]:
    """The folders a manifest's files may come from: the site's data folder and the manifest's own."""
    roots = [Path(manifest).parent]
    if data_path is not None:
        data = Path(data_path)
        roots.append(data if data.is_dir() else data.parent)
    return roots
