"""A rare positive class on real images: `visionfm finetune` at its defaults (full fine-tuning and
linear probe) against a logistic regression on each image's intensity statistics (the baseline).

    .venv/bin/python bench/bench_class_balance.py [--smoke] [--sets oct,retina] [--regimes full,frozen]

Sets (bundled, real):
- ``oct``: the 32 OCT2017 validation B-scans, diabetic macular oedema (DME) against the rest (25 %
  positive). Four folds split by patient; every fold fine-tunes on the other three (the CLI splits its
  own validation set off them) and predicts its held-out B-scans; metrics pool the four folds' held-out
  predictions (a tiny set: read the numbers with that in mind).
- ``retina``: RetinaMNIST (28 px fundus, DeepDRiD), severe diabetic retinopathy (grade >= 3) against the
  rest (24 % positive): train / val splits of the .npz for fine-tuning, the 400 test images held out.
- ``hrf``: the 45 HRF photographs (1752x1168, one eye per person), diabetic retinopathy against healthy
  and glaucoma (33 % positive): five stratified folds, pooled like ``oct`` (tiny: a second, real
  high-resolution check, not a precise one).

``--seeds 0,1,2`` repeats every fine-tuning with each seed (the baseline is deterministic) and prints
the mean and each seed's numbers; ``--option key=value`` passes any other `visionfm finetune` option
(e.g. ``--option encoder=runs/latest/encoders/fundus.safetensors``).

Both arms see the same images. The fine-tuned models run through the CLI's own code (`finetune`, then
`predict` on image files) with no option beyond the task's (``--mode binary``, ``--modality``); the
decision threshold is the model's (chosen on validation). The baseline is scikit-learn's logistic
regression (balanced class weights, standardised features) on per-channel mean and standard deviation
and the 5/25/50/75/95th grey percentiles, its threshold chosen the same way (Youden) on its training
images. Prints AUC, balanced accuracy, sensitivity and specificity for each, whether any model predicts
one class for everything, the ratio of AUCs, and the CPU model (`lscpu`).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from _bench import cpu_model
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from visionfm_core.cli.finetune import finetune_command, predict_command  # noqa: E402
from visionfm_core.data.files import read_any_image  # noqa: E402
from visionfm_core.evaluation.metrics import binary_auc  # noqa: E402
from visionfm_core.tasks.adapters.classification import youden_threshold  # noqa: E402

DATA = ROOT / "simulations" / "data"
OCT = DATA / "oct2017_val"
RETINA = DATA / "retinamnist" / "retinamnist.npz"


def intensity_statistics(image: np.ndarray) -> np.ndarray:
    """Per-channel mean and std, and grey-level percentiles, all in [0, 1]."""
    pixels = image.reshape(-1, image.shape[-1]).astype(np.float64) / 255.0
    grey = pixels.mean(axis=1)
    return np.concatenate([pixels.mean(0), pixels.std(0), np.percentile(grey, [5, 25, 50, 75, 95])])


def scores(truth: np.ndarray, probability: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    positive, negative = truth == 1, truth == 0
    sensitivity = float(np.mean(predicted[positive] == 1))
    specificity = float(np.mean(predicted[negative] == 0))
    return {
        "auc": binary_auc(positive, probability.astype(np.float64)),
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "predicted_classes": float(len(np.unique(predicted))),
    }


def baseline(train: list[tuple[Path, int]], test: list[tuple[Path, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Held-out probabilities and 0/1 decisions of the intensity-statistics logistic regression."""
    x_train = np.stack([intensity_statistics(read_any_image(str(path))) for path, _ in train])
    y_train = np.array([label for _, label in train])
    x_test = np.stack([intensity_statistics(read_any_image(str(path))) for path, _ in test])
    model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000))
    model.fit(x_train, y_train)
    threshold = youden_threshold(y_train, model.predict_proba(x_train)[:, 1])
    probability = model.predict_proba(x_test)[:, 1]
    return probability, (probability >= threshold).astype(np.int64)


def write_manifest(path: Path, rows: list[tuple[Path, int]], patients: dict[Path, str] | None = None) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "patient_id"] if patients else ["image", "label"])
        for image, label in rows:
            writer.writerow([str(image), label, patients[image]] if patients else [str(image), label])
    return path


# Options given on this bench's command line, passed on to `visionfm finetune` (empty: its defaults).
OVERRIDES: dict[str, Any] = {}
# torch CPU threads (one by default: on a shared, loaded CPU OpenMP's waits make two far slower).
THREADS: list[int | None] = [1]


def finetuned(train: Path, test: list[tuple[Path, int]], work: Path, modality: str, regime: str,
              smoke: bool, val: Path | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """`visionfm finetune` at its defaults, then `visionfm predict` on copies of the held-out images."""
    work.mkdir(parents=True, exist_ok=True)
    model, report = work / "model.safetensors", work / "finetune.json"
    tiny: dict[str, Any] = {"arch": "nano", "image_size": 32, "min_steps": 6, "epochs": 1} if smoke else {}
    finetune_command(train, model, task="classification", mode="binary", modality=modality, regime=regime,
                     val=val, report=report, threads=THREADS[0], **{**tiny, **OVERRIDES})
    folder = work / "held_out"
    folder.mkdir(exist_ok=True)
    names = {}
    for index, (path, label) in enumerate(test):
        copy = folder / f"{index:04d}{path.suffix}"
        shutil.copyfile(path, copy)
        names[copy.name] = label
    out = work / "predictions.csv"
    predict_command(model, folder, out, threads=THREADS[0])
    with out.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("class_id")]
    order = [names[Path(row["source"]).name] for row in rows]
    assert len(order) == len(test), "predict skipped held-out images"
    probability = np.array([float(row["probabilities_1"]) for row in rows])
    predicted = np.array([int(row["class_id"]) for row in rows])
    summary = json.loads(report.read_text())
    return np.array(order), np.stack([probability, predicted]), summary


def oct_folds(smoke: bool) -> tuple[list[tuple[list[tuple[Path, int]], list[tuple[Path, int]]]], dict[Path, str]]:
    """Patient-grouped folds of the OCT2017 validation B-scans, DME = 1."""
    with (OCT / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    images = [(OCT / row["path"], int(row["label"] == "DME")) for row in rows]
    patients = {OCT / row["path"]: row["patient_id"] for row in rows}
    # Patients sorted positive-first then dealt round-robin: every fold gets about a quarter of each class.
    by_patient: dict[str, list[tuple[Path, int]]] = defaultdict(list)
    for image in images:
        by_patient[patients[image[0]]].append(image)
    ordered = sorted(by_patient, key=lambda p: (-max(label for _, label in by_patient[p]), p))
    count = 2 if smoke else 4
    folds = [[image for p in ordered[k::count] for image in by_patient[p]] for k in range(count)]
    return [([i for j, f in enumerate(folds) if j != k for i in f], folds[k]) for k in range(count)], patients


Folds = list[tuple[list[tuple[Path, int]], list[tuple[Path, int]]]]


def cross_validated(folds: Folds, name: str, modality: str, regime: str, smoke: bool, work: Path,
                    patients: dict[Path, str] | None = None
                    ) -> tuple[dict[str, float], dict[str, float], list[str]]:
    """Fine-tune and fit the baseline on each fold's training part, score both on its held-out part,
    and pool the held-out predictions of every fold into one score each."""
    truth, model_out, base_prob, base_pred, warnings = [], [], [], [], []
    for k, (train, test) in enumerate(folds):
        manifest = write_manifest(work / f"{name}_train_{k}.csv", train, patients)
        labels, out, summary = finetuned(manifest, test, work / f"{name}_{regime}_{k}", modality, regime, smoke)
        truth.append(labels)
        model_out.append(out)
        warnings += summary.get("warnings", [])
        prob, pred = baseline(train, test)
        base_prob.append(prob)
        base_pred.append(pred)
    y = np.concatenate(truth)
    out_all = np.concatenate(model_out, axis=1)
    return (scores(y, out_all[0], out_all[1].astype(np.int64)),
            scores(y, np.concatenate(base_prob), np.concatenate(base_pred)), warnings)


def run_oct(regime: str, smoke: bool, work: Path) -> tuple[dict[str, float], dict[str, float], list[str]]:
    work.mkdir(parents=True, exist_ok=True)
    folds, patients = oct_folds(smoke)
    return cross_validated(folds, "oct", "oct", regime, smoke, work, patients)


def export_split(npz: Any, split: str, folder: Path, limit: int | None) -> list[tuple[Path, int]]:
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = npz[f"{split}_images"], npz[f"{split}_labels"].reshape(-1)
    count = len(images) if limit is None else min(limit, len(images))
    rows = []
    for i in range(count):
        path = folder / f"{split}_{i:04d}.png"
        Image.fromarray(images[i]).save(path)
        rows.append((path, int(labels[i] >= 3)))
    return rows


HRF = DATA / "hrf"


def hrf_folds(smoke: bool, work: Path) -> Folds:
    """Stratified folds of the HRF photographs, diabetic retinopathy = 1 (every photograph is its own
    person's eye, so folds are patient-disjoint). The photographs are copied at half size (876x584,
    still 2.6x the 224 px input the network sees) so that decoding them every step costs a quarter."""
    with (HRF / "labels.csv").open(newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: (row["category"] != "diabetic_retinopathy", row["image"]))
    folder = work / "hrf_half"
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for row in rows:
        copy = folder / Path(row["image"]).name
        if not copy.exists():
            with Image.open(HRF / row["image"]) as photo:
                photo.reduce(2).save(copy, quality=95)
        images.append((copy, int(row["category"] == "diabetic_retinopathy")))
    if smoke:
        images = images[::5]
    count = 2 if smoke else 5
    folds = [images[k::count] for k in range(count)]
    return [([i for j, f in enumerate(folds) if j != k for i in f], folds[k]) for k in range(count)]


def run_hrf(regime: str, smoke: bool, work: Path) -> tuple[dict[str, float], dict[str, float], list[str]]:
    work.mkdir(parents=True, exist_ok=True)
    return cross_validated(hrf_folds(smoke, work), "hrf", "fundus", regime, smoke, work)


def run_retina(regime: str, smoke: bool, work: Path) -> tuple[dict[str, float], dict[str, float], list[str]]:
    work.mkdir(parents=True, exist_ok=True)
    npz = np.load(RETINA)
    limit = 64 if smoke else None
    train = export_split(npz, "train", work / "retina_images", limit)
    val = export_split(npz, "val", work / "retina_images", 32 if smoke else None)
    test = export_split(npz, "test", work / "retina_images", limit)
    train_csv = write_manifest(work / "retina_train.csv", train)
    val_csv = write_manifest(work / "retina_val.csv", val)
    truth, out, summary = finetuned(train_csv, test, work / f"retina_{regime}", "fundus", regime, smoke, val_csv)
    prob, pred = baseline(train, test)
    return scores(truth, out[0], out[1].astype(np.int64)), scores(truth, prob, pred), summary.get("warnings", [])


def line(name: str, values: dict[str, float]) -> str:
    return (f"  {name:<34} AUC {values['auc']:.3f}  balanced acc {values['balanced_accuracy']:.3f}  "
            f"sensitivity {values['sensitivity']:.3f}  specificity {values['specificity']:.3f}  "
            f"classes predicted {int(values['predicted_classes'])}")


def _typed(value: str) -> Any:
    """A command-line value as int, float or str (what finetune_command's parameter expects)."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="nano ViT at 32 px, 6 steps, 2 folds, 64 images, full fine-tuning only")
    parser.add_argument("--sets", default="oct,retina")
    parser.add_argument("--regimes", default=None, help="full,frozen (default; --smoke: full)")
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    for option in ("image-size", "min-steps", "epochs"):
        parser.add_argument(f"--{option}", type=int, help=f"pass --{option} to finetune (default: its own)")
    parser.add_argument("--seeds", default="0", help="fine-tuning seeds, e.g. 0,1,2 (mean and each printed)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="any other finetune option (finetune_command's parameter name), repeatable")
    args = parser.parse_args()
    args.regimes = args.regimes or ("full" if args.smoke else "full,frozen")
    THREADS[0] = args.threads or None
    OVERRIDES.update({key: getattr(args, key) for key in ("image_size", "min_steps", "epochs")
                      if getattr(args, key) is not None})
    for option in args.option:
        key, _, value = option.partition("=")
        OVERRIDES[key.strip().replace("-", "_")] = _typed(value.strip())
    seeds = [int(seed) for seed in args.seeds.split(",")]
    if OVERRIDES:
        print(f"finetune options changed from the defaults: {OVERRIDES}")
    print(f"CPU: {cpu_model()}", flush=True)
    runners = {"oct": run_oct, "retina": run_retina, "hrf": run_hrf}
    titles = {"oct": "OCT2017 B-scans, DME vs rest (4 patient folds, pooled)",
              "retina": "RetinaMNIST test, grade >= 3 vs rest",
              "hrf": "HRF photographs, diabetic retinopathy vs rest (5 folds, pooled)"}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_class_balance_") as scratch:
        for name in args.sets.split(","):
            for regime in args.regimes.split(","):
                start = time.perf_counter()
                per_seed, base, warnings = [], {}, []
                for seed in seeds:
                    OVERRIDES["seed"] = seed
                    model, base, seed_warnings = runners[name](regime, args.smoke,
                                                               Path(scratch) / f"{name}_{regime}_{seed}")
                    per_seed.append(model)
                    warnings += seed_warnings
                seconds = time.perf_counter() - start
                model = {key: float(np.mean([m[key] for m in per_seed])) for key in per_seed[0]}
                model["predicted_classes"] = min(m["predicted_classes"] for m in per_seed)
                results[f"{name}/{regime}"] = {"finetune": model, "finetune_per_seed": per_seed, "seeds": seeds,
                                               "baseline": base, "seconds": seconds, "warnings": warnings,
                                               "options": {k: v for k, v in OVERRIDES.items() if k != "seed"}}
                print(f"{titles[name]}; regime {regime}; seeds {args.seeds} ({seconds:.0f} s)")
                print(line(f"visionfm finetune ({regime}, mean)", model))
                if len(seeds) > 1:
                    for seed, values in zip(seeds, per_seed, strict=True):
                        print(line(f"  seed {seed}", values))
                print(line("logistic regression on intensity", base))
                print(f"  ratio (fine-tune AUC / baseline AUC): {model['auc'] / base['auc']:.3f}; "
                      f"one-class model: {'YES' if model['predicted_classes'] < 2 else 'no'}", flush=True)
                for warning in sorted(set(warnings)):
                    print(f"  warning from finetune: {warning}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
