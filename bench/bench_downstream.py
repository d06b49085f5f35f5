"""Downstream quality on the bundled real data, single site (issue #3's measured numbers).

    .venv/bin/python bench/bench_downstream.py [--sections retina,oct,hrf_seg,hrf_cls,disc]
        [--encoder-arm federated=runs/x/checkpoints/round-0010/fundus.safetensors] [--out results.json]

Sections (test splits are never used for model selection):
- retina: RetinaMNIST DR grading (5 ordinal classes; 1080 train / 120 val / 400 test). Arms:
  (a) supervised from scratch; (c) centralised iBOT pretraining on all training images, then
  fine-tuning; (d) local-only iBOT on one of three non-IID simulated hospitals (Dirichlet label skew),
  then fine-tuning; (b) federated iBOT across those three hospitals (a real Flower simulation, the same
  total optimiser steps split over rounds x sites; skip with ``--no-federated``), then fine-tuning; plus
  any ``--encoder-arm NAME=PATH`` (e.g. an encoder that `visionfm simulate` wrote). Every arm fine-tunes the same
  way on the same labelled data, so arms differ only in pretraining; "same compute": (a) gets extra
  fine-tuning epochs worth the pretraining's optimiser steps. Reported: test macro AUC (95%
  bootstrap CI), accuracy, kappa.
- oct: OCT2017 4-class (the 32-image validation split), patient-grouped 4-fold cross-validation from
  scratch; each image is tested once and the pooled predictions are scored.
- hrf_seg: HRF vessel segmentation, Dice on a held-out split (field of view honoured).
- hrf_cls: HRF healthy / glaucoma / DR accuracy on a held-out split.
- disc: optic-disc centre localisation, mean radial error on HRF (experts' centres) and IDRiD (mask
  centres), in the bundled images' pixels and in disc diameters.
HRF and IDRiD photographs are shrunk once in memory (images by area, masks by majority vote,
coordinates scaled) so decoding does not dominate; errors are reported in the bundled pixels.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _bench import add_smoke_flag, print_cpu  # noqa: E402
from _shrink import shrink  # noqa: E402

import simulations  # noqa: E402
from strategies.protocol.partition import partition_indices  # noqa: E402
from visionfm_core.data.datasets import ImageDataset  # noqa: E402
from visionfm_core.data.items import ImageItem  # noqa: E402
from visionfm_core.data.loading import make_loader  # noqa: E402
from visionfm_core.data.sources import load_npz_split  # noqa: E402
from visionfm_core.data.transforms import BatchedMultiCrop, multicrop_transform  # noqa: E402
from visionfm_core.evaluation.metrics import accuracy, macro_auc  # noqa: E402
from visionfm_core.modalities import get_modality  # noqa: E402
from visionfm_core.models.checkpoint import load_encoder  # noqa: E402
from visionfm_core.models.encoders import EncoderSpec, create_encoder  # noqa: E402
from visionfm_core.models.importers import build_encoder  # noqa: E402
from visionfm_core.runtime import seed_everything  # noqa: E402
from visionfm_core.ssl.config import SSLConfig  # noqa: E402
from visionfm_core.ssl.trainer import SSLTrainer  # noqa: E402
from visionfm_core.tasks.adapters import ClassificationTask, LandmarkTask, SegmentationTask, TaskAdapter  # noqa: E402
from visionfm_core.tasks.data import Preprocess  # noqa: E402
from visionfm_core.tasks.manifests import read_classification_csv  # noqa: E402
from visionfm_core.tasks.public_sets import hrf_optic_disc, hrf_samples, idrid_optic_disc  # noqa: E402
from visionfm_core.tasks.samples import TaskSample  # noqa: E402
from visionfm_core.tasks.splits import split_samples  # noqa: E402
from visionfm_core.tasks.trainer import FineTuneConfig, FineTuner, FitResult  # noqa: E402

DATA = Path(simulations.__file__).parent / "data"
SECTIONS = ("retina", "oct", "hrf_seg", "hrf_cls", "disc")
PUBLISHED = {"ResNet-18 (28)": (0.717, 0.524), "ResNet-50 (28)": (0.726, 0.528), "AutoML Vision": (0.750, 0.531)}


# --- helpers -------------------------------------------------------------------------------------------


def fit_and_test(
    task: TaskAdapter,
    encoder: torch.nn.Module,
    train: Sequence[TaskSample],
    val: Sequence[TaskSample],
    test: Sequence[TaskSample],
    config: FineTuneConfig,
    preprocess: Preprocess,
) -> tuple[FitResult, dict[str, float]]:
    tuner = FineTuner(task, config, "cpu")
    result = tuner.fit(encoder, train, val, preprocess)
    return result, tuner.evaluate(result.model, tuner.loader(test, preprocess, train=False))


def ssl_pretrain(
    items: Sequence[ImageItem], spec: EncoderSpec, steps: int, batch: int, seed: int
) -> tuple[dict[str, torch.Tensor], float]:
    """iBOT on ``items``; returns the student backbone (the part a federation shares, so arms (b), (c) and
    (d) compare the same network) and the seconds taken."""
    started = time.perf_counter()
    seed_everything(seed)
    modality = get_modality("fundus")
    config = SSLConfig(objective="ibot", batch_size=batch, local_crops=2)
    trainer = SSLTrainer(spec, modality, config, total_steps=steps, device="cpu", seed=seed)
    multicrop = multicrop_transform(modality, config, spec.image_size, spec.patch_size)
    loader = make_loader(ImageDataset(list(items), multicrop.crop), min(batch, len(items)), 0, shuffle=True, seed=seed,
                         drop_last=True, collate_fn=BatchedMultiCrop(multicrop))
    trainer.train_steps(loader, steps, start_step=0)
    state = {k: v.detach().clone() for k, v in trainer.student.backbone.state_dict().items()}
    return state, time.perf_counter() - started


def federated_pretrain(steps: int, batch: int, seed: int, workdir: Path) -> tuple[dict[str, torch.Tensor], float, str]:
    """iBOT across 3 Dirichlet-skewed hospitals on RetinaMNIST's training images with `visionfm simulate`'s
    engine; the sites' local steps add up to ``steps``. Returns the global backbone, seconds, a description."""
    from simulations.simulate import simulate

    rounds = 4
    local_steps = max(1, steps // (3 * rounds))
    scenario = workdir / "bench_fed.toml"
    scenario.write_text(
        'name = "bench-fed"\n[datasets]\nfundus = "retinamnist"\n'
        f'[partition]\nkind = "dirichlet"\nalpha = 0.5\nseed = {seed}\n'
        + "".join(f'[[sites]]\nname = "hospital-{i}"\nmodalities = ["fundus"]\n' for i in (1, 2, 3))
    )
    overrides = {"num-rounds": rounds, "local-steps": local_steps, "batch-size": batch, "arch": "micro",
                 "image-size": 32, "patch-size": 4, "objective": "ibot", "ssl.local-crops": 2, "seed": seed,
                 "server-eval": "", "eval-every": rounds, "device": "cpu"}
    started = time.perf_counter()
    outcome = simulate(str(scenario), "federated", workdir / "run", overrides)
    state, _ = load_encoder(outcome.out_dir / "encoders" / "fundus.safetensors")
    described = f"federated iBOT, 3 hospitals (Dirichlet 0.5), {rounds} rounds x {local_steps} local steps"
    return state, time.perf_counter() - started, described


def encoder_from_state(state: dict[str, torch.Tensor], spec: EncoderSpec) -> torch.nn.Module:
    encoder = create_encoder(spec)
    encoder.load_state_dict(state, strict=True)
    return encoder


def summary(metrics: dict[str, float], keys: Sequence[str]) -> dict[str, float]:
    return {k: round(float(metrics[k]), 4) for k in keys if k in metrics}


# --- sections ------------------------------------------------------------------------------------------


def retina(args: argparse.Namespace) -> dict[str, Any]:
    npz = DATA / "retinamnist" / "retinamnist.npz"
    split = {
        name: [TaskSample(i, label=i.label) for i in load_npz_split(npz, name).items]
        for name in ("train", "val", "test")
    }
    spec = EncoderSpec("micro", 32, 4)
    preprocess = Preprocess.for_modality("fundus", 32)
    steps_per_epoch = len(split["train"]) // args.batch
    extra_epochs = math.ceil(args.ssl_steps / steps_per_epoch)
    labels = [s.label for s in split["train"]]
    hospitals = partition_indices(labels, 3, "dirichlet", alpha=0.5, seed=args.seed)
    local = [split["train"][i].item for i in hospitals[0]]
    arms: dict[str, Any] = {}
    encoders: dict[str, tuple[torch.nn.Module, str]] = {"a_scratch": (create_encoder(spec), "no pretraining")}
    state, seconds = ssl_pretrain([s.item for s in split["train"]], spec, args.ssl_steps, args.batch, args.seed)
    encoders["c_centralised_ssl"] = (
        encoder_from_state(state, spec),
        f"iBOT {args.ssl_steps} steps on 1080 images ({seconds:.0f}s)",
    )
    state, seconds = ssl_pretrain(local, spec, args.ssl_steps, args.batch, args.seed)
    encoders["d_local_ssl"] = (
        encoder_from_state(state, spec),
        f"iBOT {args.ssl_steps} steps on hospital 1 of 3 ({len(local)} images, Dirichlet 0.5; {seconds:.0f}s)",
    )
    if args.federated:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="bench-fed-") as workdir:
            state, seconds, described = federated_pretrain(args.ssl_steps, args.batch, args.seed, Path(workdir))
        encoders["b_federated_ssl"] = (encoder_from_state(state, spec), f"{described} ({seconds:.0f}s)")
    for name, path in args.encoder_arm:
        loaded, meta = load_encoder(path)
        encoder, _ = build_encoder(loaded, meta["timm_name"], meta["timm_kwargs"], 32, path)
        encoders[name] = (encoder, f"encoder file {Path(path).name}")
    for name, (encoder, origin) in encoders.items():
        started = time.perf_counter()
        epochs = args.epochs + (extra_epochs if name == "a_scratch" else 0)
        config = FineTuneConfig(
            regime="full",
            epochs=epochs,
            batch_size=args.batch,
            lr=1e-3,
            layer_decay=0.75,
            warmup_epochs=1,
            seed=args.seed,
            threads=args.threads,
        )
        task = ClassificationTask(5, "ordinal", bootstrap_resamples=1000)
        seed_everything(args.seed)
        result, test = fit_and_test(task, encoder, split["train"], split["val"], split["test"], config, preprocess)
        arms[name] = {
            "pretraining": origin,
            "finetune_epochs": epochs,
            "best_epoch": result.best_epoch,
            "val_auc": round(result.best_validation["auc"], 4),
            "test": summary(test, ("auc", "auc_ci_low", "auc_ci_high", "accuracy", "kappa", "f1")),
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(f"  retina {name}: {arms[name]['test']}", flush=True)
    return {"arms": arms, "published_test_auc_acc": PUBLISHED, "encoder": "micro (64-d, 2 blocks), patch 4, 32 px"}


def oct_cv(args: argparse.Namespace) -> dict[str, Any]:
    manifest = read_classification_csv(DATA / "oct2017_val" / "labels.csv", modality="oct")
    patients = sorted({s.item.patient_key or s.source for s in manifest.samples})
    rng = np.random.default_rng(args.seed)
    fold_of = {p: i % 4 for i, p in enumerate(rng.permutation(patients))}
    probs = np.zeros((len(manifest.samples), 4))
    preprocess = Preprocess.for_modality("oct", 64)
    for fold in range(4):
        test_idx = [i for i, s in enumerate(manifest.samples) if fold_of[s.item.patient_key or s.source] == fold]
        val = [s for s in manifest.samples if fold_of[s.item.patient_key or s.source] == (fold + 1) % 4]
        train = [s for s in manifest.samples if fold_of[s.item.patient_key or s.source] not in (fold, (fold + 1) % 4)]
        task = ClassificationTask(4, class_names=tuple(manifest.names))
        config = FineTuneConfig(epochs=args.epochs, batch_size=8, lr=1e-3, seed=args.seed, threads=args.threads)
        tuner = FineTuner(task, config)
        result = tuner.fit(create_encoder(EncoderSpec("micro", 64, 16)), train, val, preprocess)
        test = [manifest.samples[i] for i in test_idx]
        for prediction in tuner.predict(result.model, tuner.loader(test, preprocess, train=False)):
            probs[test_idx[prediction["index"]]] = [prediction["probabilities"][n] for n in manifest.names]
    truth = np.array([s.label for s in manifest.samples])
    return {
        "pooled_test": {
            "accuracy": round(accuracy(truth, probs.argmax(1)), 4),
            "auc": round(macro_auc(truth, probs, 4), 4),
        },
        "protocol": "scratch micro 64 px, patient-grouped 4-fold CV (16 train / 8 val / 8 test per fold)",
        "images": len(truth),
    }


def hrf_segmentation(args: argparse.Namespace) -> dict[str, Any]:
    samples = hrf_samples(DATA / "hrf", with_vessels=True)
    train, val, test = split_samples(samples, [0.1, 0.25], seed=args.seed)
    factor = 3
    train, val, test = ([shrink(s, factor) for s in part] for part in (train, val, test))
    task = SegmentationTask(2, ("background", "vessel"), features=8)
    config = FineTuneConfig(
        epochs=args.seg_epochs, batch_size=4, lr=2e-3, layer_decay=1.0, seed=args.seed, threads=args.threads
    )
    preprocess = Preprocess.for_modality("fundus", args.seg_size, max_zoom=1.3)
    result, metrics = fit_and_test(
        task, create_encoder(EncoderSpec("micro", args.seg_size, 16)), train, val, test, config, preprocess
    )
    return {
        "test": summary(metrics, ("dice", "iou", "dice_per_image")),
        "split": [len(train), len(val), len(test)],
        "best_epoch": result.best_epoch,
        "protocol": f"scratch micro + UNETR (8 features) at {args.seg_size} px on the letterboxed photograph; "
        "Dice at that resolution, inside the field of view",
    }


def hrf_classification(args: argparse.Namespace) -> dict[str, Any]:
    samples = [shrink(s, 6) for s in hrf_samples(DATA / "hrf")]
    train, val, test = split_samples(samples, [0.15, 0.3], seed=args.seed)
    task = ClassificationTask(3, class_names=("healthy", "glaucoma", "diabetic_retinopathy"), bootstrap_resamples=1000)
    config = FineTuneConfig(epochs=args.epochs, batch_size=8, lr=1e-3, seed=args.seed, threads=args.threads)
    result, metrics = fit_and_test(
        task,
        create_encoder(EncoderSpec("micro", 128, 16)),
        train,
        val,
        test,
        config,
        Preprocess.for_modality("fundus", 128),
    )
    return {
        "test": summary(metrics, ("accuracy", "auc", "auc_ci_low", "auc_ci_high")),
        "split": [len(train), len(val), len(test)],
        "best_epoch": result.best_epoch,
    }


def _combined_hrf_centres() -> list[TaskSample]:
    """Mean of both experts' centres; the README's two known typos take the other expert's value."""
    by_a = {Path(s.source).stem: s for s in hrf_optic_disc(DATA / "hrf", "A")}
    by_b = {Path(s.source).stem: s for s in hrf_optic_disc(DATA / "hrf", "B")}
    out = []
    for name, a in by_a.items():
        (ax, ay), (bx, by) = a.points[0], by_b[name].points[0]  # type: ignore[index]
        point = {"02_dr": (bx, by), "02_g": (ax, ay)}.get(name, ((ax + bx) / 2, (ay + by) / 2))
        out.append(replace(a, points=(point,)))
    return out


def disc_localisation(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    hrf = _combined_hrf_centres()
    sets = {"hrf": (hrf, 4, 190.0), "idrid": (idrid_optic_disc(DATA / "idrid_seg"), 2, None)}
    for name, (samples, factor, diameter) in sets.items():
        train, val, test = split_samples(samples, [0.15, 0.25], seed=args.seed)
        train, val, test = ([shrink(s, factor) for s in part] for part in (train, val, test))
        config = FineTuneConfig(
            epochs=args.disc_epochs, batch_size=4, lr=1e-3, layer_decay=1.0, seed=args.seed, threads=args.threads
        )
        result, metrics = fit_and_test(
            LandmarkTask(1, ("disc",)),
            create_encoder(EncoderSpec("micro", 128, 16)),
            train,
            val,
            test,
            config,
            Preprocess.for_modality("fundus", 128, flip=False),
        )
        if diameter is None:  # IDRiD: the disc's box width (from the masks)
            diameter = float(np.mean([s.boxes[0][2] - s.boxes[0][0] for s in samples]))
        mre = metrics["mre"] * factor  # back to the bundled images' pixels
        results[name] = {
            "test_mre_px": round(mre, 1),
            "test_mre_disc_diameters": round(mre / diameter, 3),
            "split": [len(train), len(val), len(test)],
            "best_epoch": result.best_epoch,
        }
    a = {Path(s.source).stem: s.points[0] for s in hrf_optic_disc(DATA / "hrf", "A")}  # type: ignore[index]
    b = {Path(s.source).stem: s.points[0] for s in hrf_optic_disc(DATA / "hrf", "B")}  # type: ignore[index]
    gaps = [math.dist(a[k], b[k]) for k in a if k not in ("02_dr", "02_g")]
    results["hrf"]["expert_a_vs_b_px"] = round(float(np.mean(gaps)), 1)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument(
        "--encoder-arm",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="extra RetinaMNIST arm fine-tuned from this encoder checkpoint (micro, patch 4)",
    )
    parser.add_argument("--ssl-steps", type=int, default=120)
    parser.add_argument("--no-federated", dest="federated", action="store_false",
                        help="skip arm (b), the federated pretraining simulation")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seg-epochs", type=int, default=12)
    parser.add_argument("--seg-size", type=int, default=256)
    parser.add_argument("--disc-epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    add_smoke_flag(parser)
    args = parser.parse_args(argv)
    if args.smoke:  # one section, one epoch per fold: checks the pipeline, not the numbers
        args.sections, args.epochs, args.federated = "oct", 1, False
    print_cpu()
    args.encoder_arm = [tuple(a.split("=", 1)) for a in args.encoder_arm]
    torch.set_num_threads(args.threads)
    runners = {
        "retina": retina,
        "oct": oct_cv,
        "hrf_seg": hrf_segmentation,
        "hrf_cls": hrf_classification,
        "disc": disc_localisation,
    }
    report: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "out"}}
    total = time.perf_counter()
    for section in args.sections.split(","):
        started = time.perf_counter()
        print(f"== {section}", flush=True)
        report[section] = runners[section](args)
        report[section]["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(report[section], indent=2, default=str), flush=True)
    report["seconds_total"] = round(time.perf_counter() - total, 1)
    if "oct" in report:
        accuracy_oct = report["oct"]["pooled_test"]["accuracy"]
        print(f"oct: ratio pooled accuracy / chance (0.25) = {accuracy_oct / 0.25:.2f}")
    print(f"total {report['seconds_total']} s")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
