"""The single-site `visionfm` commands, run through typer on the bundled real data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from typer.testing import CliRunner

from tests.unit.data.dicom_factory import OPT, oct_volume, write_native
from tests.unit.models.test_importers import Payload, visionfm_file
from tests.unit.tasks.helpers import DATA, RETINAMNIST, tiny_encoder
from visionfm_core.cli import build_app
from visionfm_core.models.checkpoint import load_encoder
from visionfm_core.tasks.persistence import load_task_model

APP = build_app()
OCT_FOLDER = DATA / "oct2017_val" / "val"
TINY = ["--arch", "nano", "--image-size", "32", "--device", "cpu", "--threads", "1", "--batch-size", "8",
        "--min-steps", "2"]


def run(*args: str | Path) -> str:
    result = CliRunner().invoke(APP, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(autouse=True)
def private_site_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISIONFM_STATE_DIR", str(tmp_path / "state"))  # site index written by `open_site`


@pytest.fixture(scope="module")
def oct_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCT classifier fine-tuned from an encoder pretrained by `visionfm pretrain` on RetinaMNIST."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("cli")
    encoder = folder / "encoder.safetensors"
    summary = json.loads(
        run(
            "pretrain",
            RETINAMNIST,
            "--out",
            encoder,
            "--modality",
            "oct",
            "--arch",
            "nano",
            "--image-size",
            "32",
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--local-crops",
            "2",
            "--device",
            "cpu",
            "--objective",
            "dino",
            "--keep",
            "student",
        )
    )
    assert summary["steps"] == 2 and summary["images"] == 1080
    model = folder / "oct.safetensors"
    out = json.loads(
        run(
            "finetune",
            OCT_FOLDER,
            "--out",
            model,
            "--encoder",
            encoder,
            "--modality",
            "oct",
            "--epochs",
            "1",
            "--min-steps",
            "2",
            "--regime",
            "frozen",
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--device",
            "cpu",
            "--threads",
            "1",
        )
    )
    assert out["selection_metric"] == "auc" and out["model"] == str(model)
    return model


def test_pretrain_writes_an_encoder_with_metadata(oct_model: Path) -> None:
    state, meta = load_encoder(oct_model.parent / "encoder.safetensors")
    assert meta["modality"] == "oct" and meta["source_format"] == "ssl" and meta["part"] == "student"
    assert "pos_embed" in state


def test_evaluate_reports_auc_with_interval(oct_model: Path) -> None:
    result = json.loads(run("evaluate", oct_model, OCT_FOLDER, "--bootstrap", "50", "--device", "cpu"))
    metrics = result["metrics"]
    assert metrics["count"] == 32 and 0.0 <= metrics["auc"] <= 1.0
    assert metrics["auc_ci_low"] <= metrics["auc"] <= metrics["auc_ci_high"]


def test_predict_a_folder_to_csv_and_a_dicom_file_to_json(oct_model: Path, tmp_path: Path) -> None:
    run("predict", oct_model, OCT_FOLDER / "DME", "--out", tmp_path / "dme.csv", "--device", "cpu")
    rows = list(csv.DictReader((tmp_path / "dme.csv").open()))
    assert len(rows) == 8 and rows[0]["class"] in {"CNV", "DME", "DRUSEN", "NORMAL"}
    probabilities = [float(rows[0][f"probabilities_{c}"]) for c in ("CNV", "DME", "DRUSEN", "NORMAL")]
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-3)
    dicom = write_native(
        tmp_path / "bscan.dcm", oct_volume(1)[0], sop_class=OPT, modality="OPT", photometric="MONOCHROME2"
    )
    run("predict", oct_model, dicom, "--out", tmp_path / "one.json", "--device", "cpu")
    predictions = json.loads((tmp_path / "one.json").read_text())
    assert len(predictions) == 1 and predictions[0]["source"].endswith("bscan.dcm") and predictions[0]["frame"] == 0
    assert predictions[0]["class"] in {"CNV", "DME", "DRUSEN", "NORMAL"}


def test_segmentation_from_a_manifest_writes_masks_at_image_size(tmp_path: Path) -> None:
    manifest = tmp_path / "vessels.csv"
    rows = ["image,mask,fov"] + [
        f"{DATA}/hrf/images/{n}.jpg,{DATA}/hrf/manual1/{n}.png,{DATA}/hrf/mask/{n}_mask.png"
        for n in ("01_dr", "02_g", "03_h")
    ]
    manifest.write_text("\n".join(rows) + "\n")
    model = tmp_path / "seg.safetensors"
    summary = json.loads(
        run(
            "finetune",
            manifest,
            "--task",
            "segmentation",
            "--out",
            model,
            "--epochs",
            "1",
            "--names",
            "background,vessel",
            "--no-test-flips",  # 4x the prediction arithmetic; the flips have their own tests
            "--jpeg-tiles",
            "0.5",
            *TINY,
        )
    )
    assert summary["selection_metric"] == "dice"
    assert load_task_model(model).preprocess.test_flips is False
    assert load_task_model(model).preprocess.jpeg == 0.5
    image = tmp_path / "photo.png"
    Image.open(DATA / "hrf/images/04_h.jpg").resize((565, 584)).save(image)  # another camera's size (DRIVE)
    run("predict", model, image, "--out", tmp_path / "seg.json", "--device", "cpu")
    prediction = json.loads((tmp_path / "seg.json").read_text())[0]
    mask = np.asarray(Image.open(prediction["mask_file"]))
    assert mask.shape == (584, 565) and set(np.unique(mask)) <= {0, 255}  # viewable: 0/255
    assert Path(prediction["mask_file"]) == tmp_path / "photo_mask.png"  # <stem>_mask.png beside --out


def test_weights_import_inspect_export(tmp_path: Path) -> None:
    encoder = tiny_encoder(32).eval()
    source = visionfm_file(tmp_path / "VFM_Fundus_weights.pth", encoder)
    info = json.loads(run("weights", "inspect", source))
    assert info["source_format"] == "visionfm" and info["needs_trust"] == [] and info["embed_dim"] == 32
    imported = tmp_path / "fundus.safetensors"
    assert json.loads(run("weights", "import", source, imported, "--modality", "fundus"))["arch"] == "nano"
    assert json.loads(run("weights", "inspect", imported))["kind"] == "encoder"
    run("weights", "export", imported, tmp_path / "timm_export")
    exported = timm.create_model(f"local-dir:{tmp_path / 'timm_export'}", pretrained=True).eval()
    images = torch.randn(1, 3, 32, 32)
    assert torch.equal(exported(images), encoder(images))
    run("weights", "export", imported, tmp_path / "again.pth", "--format", "visionfm")
    assert json.loads(run("weights", "inspect", tmp_path / "again.pth"))["source_format"] == "visionfm"


def test_untrusted_pickle_is_described_not_opened(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    torch.save({"model": tiny_encoder().state_dict(), "x": Payload(marker)}, tmp_path / "evil.pth")
    info = json.loads(run("weights", "inspect", tmp_path / "evil.pth"))
    assert any("Path" in name for name in info["needs_trust"]) and not marker.exists()
    result = CliRunner().invoke(
        APP, ["weights", "import", str(tmp_path / "evil.pth"), str(tmp_path / "o.st"), "--modality", "fundus"]
    )
    assert result.exit_code == 2 and "--trust" in result.output and not marker.exists()


def test_bad_data_gives_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "labels.csv"
    bad.write_text("image,grade\na.png,1\n")
    result = CliRunner().invoke(APP, ["finetune", str(bad), "--out", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 2
    assert "labels.csv" in result.output and "label" in result.output
