"""An imported VisionFM ViT-B/16 encoder fine-tunes every task head at 224 px on CPU: seconds per
optimiser step and peak memory for each task, against the frozen encoder (linear probe) as baseline.

    .venv/bin/python bench/bench_vitb_finetune.py [--steps 4] [--image-size 224] [--batch-size 2] [--smoke]

1. A ViT-B/16 with random weights (nothing is downloaded) is written as VisionFM's own pretraining save
   (``student``/``teacher`` with ``module.backbone.``/``backbone.`` keys, iBOT heads, ``args`` Namespace,
   optimiser, fp16 scaler: the layout of ``VFM_<Modality>_weights.pth``).
2. ``visionfm import-weights`` (its command function) converts it to our encoder checkpoint.
3. Each task kind of the product (classification full and frozen, segmentation, landmarks, detection,
   regression) fine-tunes from it with the product's trainer (``FineTuner.fit``) on 8 real IDRiD fundus
   photographs (1072x712; targets from the bundled optic-disc masks and boxes), 2 for validation, at the
   task's own preprocessing (segmentation: 224 px tiles, one per image per epoch here). Every task runs in
   its own process, so its peak RSS is its own.

Prints per task: seconds per optimiser step (training only, validation excluded; wall and CPU time of
all threads), steps, batch size, peak RSS; the ratio of each task's step time to the frozen-encoder
probe's; and the CPU model (`lscpu`). ``--smoke``: a 2-block 32-wide ViT at 32 px on photographs
shrunk 8 times, one process (the trainer still takes its minimum of 4 steps an epoch).
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _bench import cpu_model
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from visionfm_core.cli.weights import import_command  # noqa: E402
from visionfm_core.data.files import read_any_image  # noqa: E402
from visionfm_core.data.items import ImageItem  # noqa: E402
from visionfm_core.models.encoders import EncoderSpec, create_encoder  # noqa: E402
from visionfm_core.tasks import pipeline  # noqa: E402
from visionfm_core.tasks.adapters import (  # noqa: E402
    ClassificationTask,
    DetectionTask,
    LandmarkTask,
    RegressionTask,
    SegmentationTask,
    TaskAdapter,
)
from visionfm_core.tasks.samples import MaskEncoding, TaskSample  # noqa: E402
from visionfm_core.tasks.trainer import FineTuneConfig, FineTuner  # noqa: E402

IDRID = ROOT / "simulations" / "data" / "idrid_seg"
TASKS = ("classification-frozen", "classification", "segmentation", "landmarks", "detection", "regression")
# IDRiD's colour-coded lesion masks: the optic disc (yellow) against everything else.
DISC = MaskEncoding(mode="colour", colours=(((0, 0, 0), 0), ((255, 255, 0), 1), ((255, 0, 0), 0),
                                            ((255, 255, 255), 0), ((0, 0, 255), 0), ((0, 255, 0), 0)))


def write_visionfm_checkpoint(path: Path, smoke: bool) -> None:
    """Random ViT-B/16 weights in VisionFM's pretraining layout (as its iBOT code saves them)."""
    spec = EncoderSpec(arch="nano" if smoke else "base", image_size=32 if smoke else 224, patch_size=16)
    torch.manual_seed(0)
    state = create_encoder(spec).state_dict()
    dim, out_dim = spec.embed_dim, 64 if smoke else 8192
    head = {"mlp.0.weight": torch.randn(256, dim) * 0.02, "mlp.0.bias": torch.zeros(256),
            "last_layer.weight_g": torch.ones(out_dim, 1), "last_layer.weight_v": torch.randn(out_dim, 256) * 0.02}
    torch.save({
        "student": {**{f"module.backbone.{k}": v.clone() for k, v in state.items()},
                    "module.backbone.masked_embed": torch.zeros(1, dim),
                    **{f"module.head.{k}": v.clone() for k, v in head.items()}},
        "teacher": {**{f"backbone.{k}": v.clone() for k, v in state.items()},
                    **{f"head.{k}": v.clone() for k, v in head.items()}},
        "optimizer": {"state": {}, "param_groups": [{"lr": 7.5e-5, "weight_decay": 0.04, "params": []}]},
        "epoch": 400,
        "args": Namespace(arch="vit_base", patch_size=16, out_dim=out_dim, lr=7.5e-5),
        "ibot_loss": {"center": torch.zeros(1, out_dim), "center2": torch.zeros(1, 1, out_dim)},
        "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                        "_growth_tracker": 0},
    }, path)


def idrid_samples(kind: str, shrink: int = 1) -> list[TaskSample]:
    """10 IDRiD photographs with this task's targets from the optic-disc annotations (``shrink``:
    photographs and masks made that many times smaller in memory, targets scaled with them)."""
    with (IDRID / "optic_disc.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))[:10]
    samples = []
    for index, row in enumerate(rows):
        path = IDRID / "images" / row["image"]
        mask: Any = IDRID / "masks" / row["image"].replace(".jpg", ".png")
        item = ImageItem(str(path), modality="fundus")
        if shrink > 1:
            image = read_any_image(str(path))[::shrink, ::shrink]
            item = ImageItem(f"{path.name}/{shrink}", modality="fundus", _array=np.ascontiguousarray(image))
            mask = np.ascontiguousarray(np.asarray(Image.open(mask).convert("RGB"))[::shrink, ::shrink])
        row = {k: (float(v) / shrink if k.startswith("od_") else v) for k, v in row.items()}
        box = tuple(float(row[k]) for k in ("od_xmin", "od_ymin", "od_xmax", "od_ymax"))
        if kind.startswith("classification"):
            samples.append(TaskSample(item, label=index % 2))
        elif kind == "segmentation":
            samples.append(TaskSample(item, mask=mask))
        elif kind == "landmarks":
            samples.append(TaskSample(item, points=((float(row["od_cx"]), float(row["od_cy"])),)))
        elif kind == "detection":
            samples.append(TaskSample(item, boxes=(box,), box_labels=(0,)))  # type: ignore[arg-type]
        else:
            samples.append(TaskSample(item, values=(box[2] - box[0],)))
    return samples


def task_for(kind: str) -> TaskAdapter:
    if kind.startswith("classification"):
        return ClassificationTask(2, mode="binary", class_weighting="balanced")
    if kind == "segmentation":
        return SegmentationTask(2, ("background", "disc"), DISC)
    if kind == "landmarks":
        return LandmarkTask(1, ("disc",))
    if kind == "detection":
        return DetectionTask(1, ("disc",))
    return RegressionTask(1, ("disc_width",))


def run_task(kind: str, encoder_path: Path, image_size: int, steps: int, batch_size: int,
             smoke: bool = False) -> dict[str, Any]:
    """Fine-tune one task head (and the encoder unless frozen) for ``steps`` steps; time the training."""
    task = task_for(kind)
    encoder, meta = pipeline.prepare_encoder(pipeline.EncoderSource(str(encoder_path)), "fundus", image_size)
    options = {**task.preprocess_defaults(), "fov_crop": True, "crops_per_image": 1}
    if smoke and options.get("tiles"):
        options["fov_diameter"] = 64  # a few 32-px tiles per photograph
    preprocess = pipeline.preprocess_for(meta, image_size, **options)
    regime = "frozen" if kind.endswith("frozen") else "full"
    config = FineTuneConfig(regime=regime, epochs=1, min_steps=steps, batch_size=batch_size)  # type: ignore[arg-type]
    tuner = FineTuner(task, config, "cpu")
    trained = {"seconds": 0.0, "cpu_seconds": 0.0}
    train_epochs = tuner.train_epochs

    def timed(*args: Any, **kwargs: Any) -> Any:
        start, cpu_start = time.perf_counter(), time.process_time()
        result = train_epochs(*args, **kwargs)
        trained["seconds"] += time.perf_counter() - start
        trained["cpu_seconds"] += time.process_time() - cpu_start
        return result

    tuner.train_epochs = timed  # type: ignore[method-assign]
    samples = idrid_samples(kind, shrink=8 if smoke else 1)
    result = tuner.fit(encoder, samples[:8], samples[8:], preprocess)
    return {
        "task": kind,
        "steps": result.steps,
        "batch_size": result.batch_size,
        "seconds_per_step": trained["seconds"] / max(1, result.steps),
        # CPU seconds (all threads) per step: on a shared machine, less dependent on the load than wall time.
        "cpu_seconds_per_step": trained["cpu_seconds"] / max(1, result.steps),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "parameters_m": sum(p.numel() for p in result.model.parameters()) / 1e6,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny ViT at 32 px, 2 steps, one process")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--encoder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_task(args.worker, args.encoder, args.image_size, args.steps,
                                              args.batch_size)), flush=True)
        return
    if args.smoke:
        args.steps, args.image_size = 2, 32
    print(f"CPU: {cpu_model()}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_vitb_") as scratch:
        upstream, encoder = Path(scratch) / "VFM_Fundus_weights.pth", Path(scratch) / "fundus_vitb.safetensors"
        write_visionfm_checkpoint(upstream, args.smoke)
        start = time.perf_counter()
        import_command(upstream, encoder, modality="fundus")
        print(f"import-weights: {time.perf_counter() - start:.1f} s ({upstream.stat().st_size / 1e6:.0f} MB upstream)")
        for kind in args.tasks.split(","):
            if args.smoke:
                results[kind] = run_task(kind, encoder, args.image_size, args.steps, args.batch_size, smoke=True)
            else:
                command = [sys.executable, __file__, "--worker", kind, "--encoder", str(encoder),
                           "--image-size", str(args.image_size), "--steps", str(args.steps),
                           "--batch-size", str(args.batch_size)]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
                if done.returncode or not lines:
                    print(f"{kind}: FAILED (exit {done.returncode})\n{done.stderr[-3000:]}")
                    continue
                results[kind] = json.loads(lines[-1][len("RESULT "):])
            row = results[kind]
            print(f"{kind:<22} {row['seconds_per_step']:7.2f} s/step, "
                  f"{row['cpu_seconds_per_step']:7.2f} CPU s/step  ({row['steps']} steps of batch "
                  f"{row['batch_size']} at {args.image_size} px, {row['threads']} threads)  peak RSS "
                  f"{row['peak_rss_mb']:7.0f} MB  {row['parameters_m']:.1f} M parameters", flush=True)
    base = results.get("classification-frozen")
    if base:
        for kind, row in results.items():
            if kind != "classification-frozen":
                print(f"ratio ({kind} step / frozen-encoder probe step): "
                      f"{row['seconds_per_step'] / base['seconds_per_step']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
