"""The single-site commands as a researcher meets them: progress while they run, skipped files named,
and `predict` output that opens in any image viewer."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from tests.unit.tasks.helpers import DATA, RETINAMNIST
from visionfm_core.cli import build_app
from visionfm_core.cli.predict_output import mask_file_names, mask_image, palette
from visionfm_core.progress import EpochLine, PlainProgress, RichProgress, console_progress

APP = build_app()
TINY = ["--arch", "nano", "--image-size", "32", "--device", "cpu", "--threads", "1", "--batch-size", "8"]
EPOCH_LINE = re.compile(r"^epoch (\d+)/2, loss \d+\.\d{4}, validation dice (\d\.\d{4}|n/a), \d+\.\d s$", re.M)


def run(*args: str | Path) -> str:
    result = CliRunner().invoke(APP, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(autouse=True)
def private_site_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISIONFM_STATE_DIR", str(tmp_path / "state"))


def _photo(path: Path, name: str = "04_h", size: tuple[int, int] = (96, 64)) -> Path:
    with Image.open(DATA / "hrf" / "images" / f"{name}.jpg") as image:
        image.resize(size).save(path)
    return path


@pytest.fixture(scope="module")
def vessel_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A tiny HRF vessel segmenter fine-tuned for two epochs through the CLI, and what it printed."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("seg")
    manifest = folder / "vessels.csv"
    rows = ["image,mask"] + [f"{DATA}/hrf/images/{n}.jpg,{DATA}/hrf/manual1/{n}.png" for n in ("01_dr", "02_g", "03_h")]
    manifest.write_text("\n".join(rows) + "\n")
    model = folder / "seg.safetensors"
    result = CliRunner().invoke(APP, ["finetune", str(manifest), "--task", "segmentation", "--out", str(model),
                                      "--epochs", "2", "--min-steps", "2", "--val-fraction", "0.34",
                                      "--names", "background,vessel", *TINY], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    yield model, result.output
    torch.set_num_threads(previous)


def test_finetune_prints_one_line_per_epoch_off_a_terminal(vessel_model: tuple[Path, str]) -> None:
    _, output = vessel_model
    assert [m.group(1) for m in EPOCH_LINE.finditer(output)] == ["1", "2"], output
    assert re.search(r"^fine-tuned on \d+ images, best epoch [12] in \d+\.\d s$", output, re.M), output
    assert "\x1b[" not in output  # no bar's control characters in a log


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere() -> None:
    terminal = Console(file=io.StringIO(), force_terminal=True, width=100)
    log = Console(file=io.StringIO(), force_terminal=False, width=100)
    assert isinstance(console_progress(terminal), RichProgress)
    assert isinstance(console_progress(log), PlainProgress) and not isinstance(console_progress(log), RichProgress)
    for console in (terminal, log):
        progress = console_progress(console)
        progress.start("train", 4, "fine-tuning")
        progress.advance("train", 4)
        progress.epoch(EpochLine(1, 1, 0.5, 2.0, "auc", 0.75))
        progress.finish("train", "fine-tuned on 8 images")
    assert "epoch 1/1, loss 0.5000, validation auc 0.7500, 2.0 s" in log.file.getvalue()  # type: ignore[attr-defined]
    shown = terminal.file.getvalue()  # type: ignore[attr-defined]
    assert "fine-tuning" in shown and "4/4" in shown and "validation auc 0.7500" in shown


def test_predict_writes_viewable_masks_beside_the_csv(vessel_model: tuple[Path, str], tmp_path: Path) -> None:
    model, _ = vessel_model
    inputs = tmp_path / "photos"
    inputs.mkdir()
    _photo(inputs / "patient7_left.png", size=(96, 64))
    _photo(inputs / "patient8_right.jpg", "05_h", size=(80, 72))
    out = tmp_path / "results" / "vessels.csv"
    run("predict", model, inputs, "--out", out, "--device", "cpu")
    rows = {Path(r["source"]).name: r for r in csv.DictReader(out.open())}
    for name, size in (("patient7_left.png", (96, 64)), ("patient8_right.jpg", (80, 72))):
        mask_path = out.parent / f"{Path(name).stem}_mask.png"
        assert rows[name]["mask_file"] == str(mask_path)
        with Image.open(mask_path) as mask:
            assert mask.size == size and mask.mode == "L"
            assert set(np.unique(np.asarray(mask))) <= {0, 255}


def test_several_classes_become_a_palette_image_of_class_ids(tmp_path: Path) -> None:
    classes = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    image = mask_image(classes, 3)
    image.save(tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as saved:
        assert saved.mode == "P" and np.array_equal(np.asarray(saved), classes)
        colours = {tuple(c) for c in np.asarray(saved.convert("RGB")).reshape(-1, 3)}
    assert len(colours) == 3 and (0, 0, 0) in colours
    assert len(set(palette(40))) == 40


def test_mask_names_follow_the_image_and_never_collide() -> None:
    names = mask_file_names([("/a/CNV/x.jpeg", None), ("/a/DME/x.jpeg", None), ("/v/scan.dcm", 0),
                             ("/v/scan.dcm", 1), ("/o/e.fda", -1)])
    assert names == ["x_mask.png", "DME_x_mask.png", "scan_frame0_mask.png", "scan_frame1_mask.png",
                     "e_fundus1_mask.png"]


def test_predict_warns_about_annotation_files_and_names_skipped_ones(
    vessel_model: tuple[Path, str], tmp_path: Path
) -> None:
    model, _ = vessel_model
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    photo = _photo(dataset / "06_h.png")
    annotation = dataset / "06_h_vessels.png"
    shutil.copy(DATA / "hrf" / "manual1" / "06_h.png", annotation)
    broken = dataset / "07_h.jpg"
    broken.write_bytes((DATA / "hrf" / "images" / "07_h.jpg").read_bytes()[:600])
    output = run("predict", model, dataset, "--out", tmp_path / "p.json", "--device", "cpu")
    assert "1 of 2 input(s) look like masks or annotations" in output, output
    assert f"  {annotation}\n" in output and f"  {photo}\n" not in output
    assert f"skipped {broken}: " in output


def test_predict_runs_on_the_threads_it_is_given(vessel_model: tuple[Path, str], tmp_path: Path) -> None:
    model, _ = vessel_model
    seen: list[int] = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: seen.append(torch.get_num_threads()))
    try:
        run("predict", model, _photo(tmp_path / "p.png"), "--out", tmp_path / "p.csv", "--device", "cpu",
            "--threads", "2")
    finally:
        hook.remove()
    assert seen and set(seen) == {2}


def test_evaluate_and_pretrain_name_the_files_they_skip(vessel_model: tuple[Path, str], tmp_path: Path) -> None:
    model, _ = vessel_model
    broken = tmp_path / "broken.jpg"
    broken.write_bytes((DATA / "hrf" / "images" / "08_h.jpg").read_bytes()[:600])
    manifest = tmp_path / "test.csv"
    manifest.write_text(f"image,mask\n{DATA}/hrf/images/08_h.jpg,{DATA}/hrf/manual1/08_h.png\n"
                        f"{broken},{DATA}/hrf/manual1/09_h.png\n")
    output = run("evaluate", model, manifest, "--device", "cpu", "--threads", "1")
    assert f"skipped {broken}: " in output and "evaluated 2 images in" in output
    images = tmp_path / "unlabelled"
    images.mkdir()
    for number in range(3):
        Image.fromarray(np.load(RETINAMNIST)["train_images"][number]).save(images / f"{number}.png")
    (images / "cut.png").write_bytes((images / "0.png").read_bytes()[:40])
    (images / "notes.bin").write_bytes(b"not an image")
    output = run("pretrain", images, "--out", tmp_path / "enc.safetensors", "--steps", "2", "--batch-size", "2",
                 "--local-crops", "0", "--image-size", "32", "--arch", "nano", "--objective", "dino", "--device",
                 "cpu")
    assert f"skipped {images / 'cut.png'}: " in output and f"skipped {images / 'notes.bin'}: " in output
    assert re.search(r"^step 2/2, loss \d+\.\d{4}, \d+\.\d s$", output, re.M), output
    assert json.loads(output[output.index("{"):])["skipped"] == 2
