"""Readers for public ophthalmic sets in their published layouts (as bundled under simulations/data):
HRF (vessels, field of view, diagnosis, expert optic-disc centres) and the IDRiD segmentation subset.

They return `TaskSample`s, so these sets serve the same fine-tuning and evaluation code as a site's
own CSV manifests. Each photograph is its own patient key (HRF and IDRiD: one image per person).
"""

from __future__ import annotations

import csv
from pathlib import Path

from visionfm_core.data.items import ImageItem
from visionfm_core.errors import DataError
from visionfm_core.tasks.samples import MaskEncoding, TaskSample

HRF_CLASSES = ("healthy", "glaucoma", "diabetic_retinopathy")
# IDRiD masks: each lesion and the optic disc in its own colour; an overlap is a mix, hence ignored.
IDRID_COLOURS = {
    "microaneurysm": (255, 255, 255),
    "haemorrhage": (255, 0, 0),
    "hard_exudate": (0, 0, 255),
    "soft_exudate": (0, 255, 0),
    "optic_disc": (255, 255, 0),
}


def _read(csv_path: Path) -> list[dict[str, str]]:
    try:
        with csv_path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    except FileNotFoundError as exc:
        raise DataError(str(csv_path), "file not found") from exc


def hrf_samples(root: str | Path, with_vessels: bool = False) -> list[TaskSample]:
    """HRF images with diagnosis labels (0 healthy, 1 glaucoma, 2 DR) and field-of-view masks;
    ``with_vessels`` keeps only the images with a manual vessel mask and attaches it."""
    root = Path(root)
    samples = []
    for row in _read(root / "labels.csv"):
        if with_vessels and not row["vessel_mask"]:
            continue
        name = Path(row["image"]).stem
        samples.append(
            TaskSample(
                ImageItem(str(root / row["image"]), patient_key=name),  # HRF: one photograph per person
                label=HRF_CLASSES.index(row["category"]),
                mask=str(root / row["vessel_mask"]) if row["vessel_mask"] else None,
                fov=str(root / row["fov_mask"]),
            )
        )
    return samples


def hrf_optic_disc(root: str | Path, expert: str = "A") -> list[TaskSample]:
    """HRF images with one expert's optic-disc centre as a landmark ``(x, y)`` in image pixels."""
    root = Path(root)
    centres = {}
    for row in _read(root / f"optic_disk_centers_expert_{expert}_half.csv"):
        # Expert B writes "01dr" for "01_dr".
        key = row["image"] if "_" in row["image"] else f"{row['image'][:2]}_{row['image'][2:]}"
        centres[key] = (float(row["Pap. Center x"]), float(row["Pap. Center y"]))
    samples = []
    for sample in hrf_samples(root):
        name = Path(sample.source).stem
        if name in centres:
            samples.append(TaskSample(sample.item, label=sample.label, points=(centres[name],), fov=sample.fov))
    return samples


def idrid_optic_disc(root: str | Path) -> list[TaskSample]:
    """IDRiD images with the optic disc as a mask (yellow), a box and a centre (computed from the mask)."""
    root = Path(root)
    samples = []
    for row in _read(root / "optic_disc.csv"):
        stem = Path(row["image"]).stem
        box = tuple(float(row[k]) for k in ("od_xmin", "od_ymin", "od_xmax", "od_ymax"))
        samples.append(
            TaskSample(
                ImageItem(str(root / "images" / row["image"]), patient_key=stem),
                mask=str(root / "masks" / f"{stem}.png"),
                points=((float(row["od_cx"]), float(row["od_cy"])),),
                boxes=(box,),  # type: ignore[arg-type]
                box_labels=(0,),
            )
        )
    return samples


def idrid_disc_encoding() -> MaskEncoding:
    """Optic disc = 1; background and the lesions = 0; overlaps (mixed colours) ignored."""
    colours = [((0, 0, 0), 0), *((rgb, 0) for name, rgb in IDRID_COLOURS.items() if name != "optic_disc")]
    return MaskEncoding("colour", (*colours, (IDRID_COLOURS["optic_disc"], 1)))
