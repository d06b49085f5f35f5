"""Reading downstream data: CSV manifests per task, class folders, .npz; errors name row and column."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.unit.tasks.helpers import DATA, RETINAMNIST
from visionfm_core.errors import DataError
from visionfm_core.tasks.manifests import (
    classification_source,
    read_classification_csv,
    read_detection_csv,
    read_landmark_csv,
    read_regression_csv,
    read_segmentation_csv,
)
from visionfm_core.tasks.public_sets import hrf_optic_disc, hrf_samples, idrid_optic_disc


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_classification_csv_names_and_ids(tmp_path: Path) -> None:
    csv_path = _write(tmp_path / "train.csv", "image,label,patient_id\na.png,dme,p1\nb.png,cnv,p2\nc.png,dme,p1\n")
    manifest = read_classification_csv(csv_path)
    assert manifest.names == ["cnv", "dme"]
    assert [s.label for s in manifest.samples] == [1, 0, 1]
    assert manifest.samples[0].source == str(tmp_path / "a.png")
    assert manifest.samples[0].item.patient_key == "p1"
    numeric = read_classification_csv(_write(tmp_path / "n.csv", "image,label\na.png,0\nb.png,4\n"))
    assert numeric.names == ["0", "1", "2", "3", "4"] and numeric.samples[1].label == 4


def test_classification_csv_rejects_unknown_class_with_row(tmp_path: Path) -> None:
    csv_path = _write(tmp_path / "val.csv", "image,label\na.png,cnv\nb.png,unknown\n")
    with pytest.raises(DataError, match=r"val.csv: row 3, column 'label'"):
        read_classification_csv(csv_path, class_names=["cnv", "dme"])


def test_multilabel_csv(tmp_path: Path) -> None:
    manifest = read_classification_csv(
        _write(tmp_path / "m.csv", "image,labels\na.png,dr|amd\nb.png,\nc.png,amd\n"), multilabel=True
    )
    assert manifest.names == ["amd", "dr"]
    assert [s.labels for s in manifest.samples] == [(1, 1), (0, 0), (1, 0)]


def test_missing_image_column_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs an image column"):
        read_classification_csv(_write(tmp_path / "x.csv", "picture,label\na.png,1\n"))


def test_segmentation_landmark_detection_regression_manifests(tmp_path: Path) -> None:
    seg = read_segmentation_csv(_write(tmp_path / "s.csv", "image,mask,fov\na.png,a_m.png,\nb.png,b_m.png,b_f.png\n"))
    assert seg.samples[0].mask == str(tmp_path / "a_m.png") and seg.samples[0].fov is None
    assert seg.samples[1].fov == str(tmp_path / "b_f.png")
    marks = read_landmark_csv(_write(tmp_path / "l.csv", "image,fovea_x,fovea_y,disc_x,disc_y\na.png,1,2,,\n"))
    assert marks.names == ["fovea", "disc"]
    assert marks.samples[0].points[0] == (1.0, 2.0) and math.isnan(marks.samples[0].points[1][0])  # type: ignore[index]
    boxes = read_detection_csv(
        _write(tmp_path / "d.csv", "image,x0,y0,x1,y1,label\na.png,0,0,5,5,disc\na.png,6,6,9,9,lesion\nb.png,,,,,\n")
    )
    assert boxes.names == ["disc", "lesion"]
    assert [len(s.boxes) for s in boxes.samples] == [2, 0]
    assert boxes.samples[0].box_labels == (0, 1)
    values = read_regression_csv(_write(tmp_path / "r.csv", "image,hba1c,age\na.png,6.5,\n"), ["hba1c", "age"])
    assert values.samples[0].values[0] == 6.5 and math.isnan(values.samples[0].values[1])  # type: ignore[index]


def test_bad_numbers_and_empty_boxes_name_row_and_column(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"row 2, column 'age': 'old' is not a number"):
        read_regression_csv(_write(tmp_path / "r.csv", "image,age\na.png,old\n"), ["age"])
    with pytest.raises(DataError, match="row 2: box"):
        read_detection_csv(_write(tmp_path / "d.csv", "image,x0,y0,x1,y1,label\na.png,5,5,1,1,disc\n"))


def test_class_folders_and_npz() -> None:
    oct_manifest = classification_source(DATA / "oct2017_val" / "val", modality="oct")
    assert oct_manifest.names == ["CNV", "DME", "DRUSEN", "NORMAL"]
    assert len(oct_manifest.samples) == 32
    npz = classification_source(RETINAMNIST, split="val")
    assert len(npz.samples) == 120 and npz.names == ["0", "1", "2", "3", "4"]


def test_public_set_readers() -> None:
    vessels = hrf_samples(DATA / "hrf", with_vessels=True)
    assert len(vessels) == 42 and all(s.mask and s.fov for s in vessels)
    discs = hrf_optic_disc(DATA / "hrf", expert="B")  # expert B writes "01dr"
    assert len(discs) == 45 and discs[0].points is not None
    idrid = idrid_optic_disc(DATA / "idrid_seg")
    assert len(idrid) == 20 and len(idrid[0].boxes) == 1
    x0, y0, x1, y1 = idrid[0].boxes[0]
    cx, cy = idrid[0].points[0]  # type: ignore[index]
    assert x0 < cx < x1 and y0 < cy < y1
