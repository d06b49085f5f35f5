"""Label efficiency (issue #12, "Show it"): how much each kind of pretraining helps a hospital that has only a
few labelled photographs.

    .venv/bin/python bench/bench_label_efficiency.py [--out runs/label-efficiency] [--seeds 0,1,2]
        [--labels 2,4,8,all] [--rounds 3 --local-steps 8] [--finetune-steps 50] [--report-into RUN_DIR]
    # or stage by stage, side by side: --stage pretrain --arms local_ssl | federated_ssl | centralized_ssl,
    # --stage finetune --arms ... --tasks vessels|disc, then --stage report

Data: the bundled HRF photographs (vessel masks, expert A's optic-disc centres) and IDRiD photographs, all
shrunk once to 438 px wide (HRF by 4). The held-out test set is the 11 photographs of the bundled
`hrf-vessels` task set's test split, for both tasks; they are never pretrained or fine-tuned on (they are not
even written to the pretraining folder).

Pretraining (iBOT, micro ViT, patch 8, 64 px views of 2-12 % of a photograph, i.e. near the scale the vessel
tiles are fine-tuned at; every arm the same SSL settings, seed and scenario, which this script writes:
3 hospitals, an IID share each of the other 34 HRF and the 20 IDRiD photographs, unlabelled, in the folder
dataset `<out>/pretrain-data`):
  (a) random init: no pretraining;
  (b) local-only SSL: hospital-a alone, rounds x local steps, through the code `visionfm simulate --mode local`
      runs for each site (simulations.baselines), for hospital-a only;
  (c) federated SSL: `visionfm simulate --mode federated` (Flower's Ray simulation, FedAvg of the 3 hospitals);
  (d) centralized SSL: `visionfm simulate --mode centralized` (the 3 hospitals' images pooled; per round as
      many steps as the 3 hospitals together, so (c) and (d) spend the same compute, (b) a third of it).
Fine-tuning (`visionfm finetune`'s library path, `pipeline.finetune` with the task's default preprocessing,
then `pipeline.evaluate` on the saved model, as `visionfm evaluate` does): hospital-a fine-tunes on 2, 4, 8
or all of its labelled HRF photographs (a seeded draw per seed), validating on those same photographs (a
hospital with 2 labels has no others), with the same number of optimiser steps in every arm and at every
label count. Tasks: vessel segmentation (tiles at the photograph's own resolution; Dice at each test
photograph's own pixels inside the field of view) and optic-disc centre localisation (the landmark task;
mean radial error in the bundled 1752x1168 pixels and in disc diameters). Pretraining runs once (seed 0);
the seeds vary the labelled draw and the fine-tuning.

Writes `<out>/label_efficiency.json` (every number) and `<out>/label_efficiency.png` (the curves), prints
`CPU: <lscpu model>` and `ratio` lines (fed-SSL / random-init Dice at 4 labels, and fed / local).
`--smoke`: 1 seed, labels 2 and 4, 1 round x 1 step of pretraining on 9 photographs, 2 fine-tuning steps,
2 test photographs; it skips arm (c), the Ray simulation (it does not start within seconds on a loaded
machine), and says so; `--smoke-federated` includes it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _bench import add_smoke_flag, cpu_model, print_cpu  # noqa: E402
from _shrink import shrink  # noqa: E402

from strategies.protocol.datasets import DATA_DIR  # noqa: E402
from strategies.protocol.scenario import load_scenario, site_items  # noqa: E402
from strategies.protocol.task_sets import load_task_set  # noqa: E402
from visionfm_core.tasks import pipeline  # noqa: E402
from visionfm_core.tasks.adapters import LandmarkTask, SegmentationTask, TaskAdapter  # noqa: E402
from visionfm_core.tasks.persistence import load_task_model  # noqa: E402
from visionfm_core.tasks.public_sets import hrf_optic_disc, hrf_samples  # noqa: E402
from visionfm_core.tasks.samples import TaskSample  # noqa: E402
from visionfm_core.tasks.trainer import FineTuneConfig  # noqa: E402

WIDTH = 438  # every photograph's width after shrinking (HRF's bundled 1752 px / 4)
HRF_FACTOR = 4
ARMS = ("random_init", "local_ssl", "federated_ssl", "centralized_ssl")
ARM_TITLES = {"random_init": "(a) random init", "local_ssl": "(b) local-only SSL",
              "federated_ssl": "(c) federated SSL", "centralized_ssl": "(d) centralized SSL"}
SITES = ("hospital-a", "hospital-b", "hospital-c")
RESULT_NAME = "label_efficiency.json"
PLOT_NAME = "label_efficiency.png"


# --- data ----------------------------------------------------------------------------------------------


def held_out_names() -> set[str]:
    """The test photographs: the bundled `hrf-vessels` task set's test split (also the disc task's test)."""
    return {Path(s.source).stem for s in load_task_set("hrf-vessels").test}


def write_pretraining_folder(folder: Path, test_names: set[str], limit: int | None = None) -> int:
    """The unlabelled photographs the hospitals pretrain on, at the working size: every HRF photograph but the
    held-out test ones (they are not written at all), and IDRiD's. No labels: SSL needs none, and without a
    labelled `test/` split the simulation skips its k-NN/linear probe (minutes of CPU here)."""
    folder.mkdir(parents=True, exist_ok=True)
    hrf = sorted((DATA_DIR / "hrf" / "images").glob("*.jpg"))
    idrid = sorted((DATA_DIR / "idrid_seg" / "images").glob("*.jpg"))
    sources = [p for p in [*hrf, *idrid] if p.stem not in test_names][:limit]
    for path in sources:
        target = folder / f"{path.stem}.png"
        if not target.is_file():
            with Image.open(path) as image:
                height = round(image.height * WIDTH / image.width)
                image.convert("RGB").resize((WIDTH, height), Image.Resampling.BOX).save(target)
    return len(sources)


def write_scenario(path: Path, data: Path, args: argparse.Namespace) -> Path:
    sites = "".join(f'[[sites]]\nname = "{name}"\nmodalities = ["fundus"]\n\n' for name in SITES)
    path.write_text(
        'name = "label-efficiency"\n'
        'description = "3 hospitals pretrain the fundus encoder on HRF + IDRiD photographs '
        '(label-efficiency bench)"\n\n'
        f'[datasets]\nfundus = "{data.resolve()}"\n\n[partition]\nkind = "iid"\nseed = 0\n\n{sites}'
        f'[run]\nnum-rounds = {args.rounds}\nlocal-steps = {args.local_steps}\nbatch-size = {args.ssl_batch}\n'
        f'arch = "micro"\nimage-size = {args.image_size}\npatch-size = {args.patch_size}\nobjective = "ibot"\n'
        f'"ssl.local-crops" = 2\n"ssl.out-dim" = 256\n"ssl.head-hidden-dim" = 256\n"ssl.head-bottleneck-dim" = 64\n'
        f'"ssl.global-crop-scale" = "{args.global_scale}"\n'
        f'"ssl.local-crop-scale" = "{args.local_scale}"\nseed = 0\nknn-k = 5\neval-every = {args.rounds}\n'
        'device = "cpu"\n'
    )
    return path


# --- pretraining ---------------------------------------------------------------------------------------


def local_pretrain(scenario: Path, out: Path) -> Path:
    """Arm (b): hospital-a alone, through the same code and config `simulate --mode local` runs for each site
    (simulations.baselines), for hospital-a only: the other two sites' local encoders are not needed here."""
    from server.federation.checkpoints import save_encoders
    from server.federation.report import MetricsLog
    from simulations.baselines import _train_alone
    from strategies.protocol.scenario import resolve_config, site_data
    from visionfm_core.pretraining import encoder_spec

    loaded = load_scenario(str(scenario))
    folder = out / "ssl-local" / SITES[0]
    folder.mkdir(parents=True, exist_ok=True)
    cfg = resolve_config(loaded, str(scenario), {"out-dir": str(folder), "server-eval": ""})
    data = site_data(loaded, 0, cfg.val_fraction)
    arrays = _train_alone(SITES[0], data, cfg, {m: cfg.local_steps for m in data}, MetricsLog(folder), None,
                          seed_offset=1)  # as run_local seeds site 0
    written = save_encoders(folder / "encoders", arrays, list(data), encoder_spec(cfg), round=cfg.num_rounds,
                            objective=cfg.objective)
    return written[0]


def pretrain(scenario: Path, out: Path, arms: Sequence[str], smoke: bool, smoke_federated: bool) -> None:
    """Run the asked SSL arms, each writing `pretrained-<arm>.json` (encoder path, seconds) when done."""
    from simulations.simulate import simulate

    if smoke and not smoke_federated and "federated_ssl" in arms:
        arms = [a for a in arms if a != "federated_ssl"]
        print("smoke: arm (c) federated SSL skipped (a Ray simulation does not start in a few seconds here); "
              "the full run and --smoke-federated run it", flush=True)
    for arm in arms:
        started = time.perf_counter()
        if arm == "local_ssl":
            encoder, mode = local_pretrain(scenario, out), "local (hospital-a)"
        elif arm in ("federated_ssl", "centralized_ssl"):
            mode = arm.split("_")[0]
            outcome = simulate(str(scenario), mode, out / f"ssl-{mode}", {"server-eval": ""})
            encoder = outcome.out_dir / "encoders" / "fundus.safetensors"
        else:
            continue  # random init: nothing to pretrain
        if not encoder.is_file():
            raise FileNotFoundError(f"{arm} wrote no encoder at {encoder}")
        info = {"encoder": str(encoder), "mode": mode, "seconds": round(time.perf_counter() - started, 1)}
        (out / f"pretrained-{arm}.json").write_text(json.dumps(info, indent=1))
        print(f"pretrained {arm} ({mode}) in {info['seconds']} s", flush=True)


def pretrained_encoders(out: Path) -> dict[str, Any]:
    """What the pretraining stage(s) wrote: arm -> {encoder, mode, seconds}."""
    found = {}
    for arm in ARMS:
        path = out / f"pretrained-{arm}.json"
        if path.is_file():
            found[arm] = json.loads(path.read_text())
    return found


# --- fine-tuning ---------------------------------------------------------------------------------------


def labelled_sets(scenario: Path, test_names: set[str], test_limit: int | None = None
                  ) -> dict[str, dict[str, list[TaskSample]]]:
    """Hospital-a's labelled photographs (those of its pretraining share that HRF labels) and the test set,
    per task, shrunk to the working size."""
    share = {Path(i.source).stem for i in site_items(load_scenario(str(scenario)), "fundus")[0]}
    vessels = hrf_samples(DATA_DIR / "hrf", with_vessels=True)
    discs = hrf_optic_disc(DATA_DIR / "hrf", "A")
    out: dict[str, dict[str, list[TaskSample]]] = {}
    for task, samples in (("vessels", vessels), ("disc", discs)):
        out[task] = {
            "site": [shrink(s, HRF_FACTOR) for s in samples if Path(s.source).stem in share],
            "test": [shrink(s, HRF_FACTOR) for s in samples if Path(s.source).stem in test_names][:test_limit],
        }
    return out


def task_for(name: str) -> tuple[TaskAdapter, dict[str, Any]]:
    if name == "vessels":
        # The product's segmentation defaults (tiles, augmentations), the photographs already at working size.
        return SegmentationTask(2, ("background", "vessel")), {"fov_diameter": 0, "crops_per_image": 4,
                                                                 "overlap": 0.25}
    return LandmarkTask(1, ("optic_disc",)), {"flip": False}  # a mirrored photograph would move the disc


def finetune_once(task_name: str, encoder: str | None, train: Sequence[TaskSample], test: Sequence[TaskSample],
                  seed: int, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    """`visionfm finetune` then `visionfm evaluate` (their library functions) for one arm, label count, seed."""
    task, options = task_for(task_name)
    config = FineTuneConfig(epochs=1, min_steps=args.finetune_steps, batch_size=8, lr=args.lr, layer_decay=0.75,
                            seed=seed, threads=args.threads, max_validations=args.validations)
    source = pipeline.EncoderSource(checkpoint=encoder, arch="micro", patch_size=args.patch_size)
    model_path = workdir / f"{task_name}.safetensors"
    result = pipeline.finetune(task, source, "fundus", train, train, config, args.image_size, "cpu", out=model_path,
                               preprocess_options=options)
    metrics = pipeline.evaluate(load_task_model(model_path), test, "cpu", batch_size=8, threads=args.threads)
    scores = {"steps": float(result.steps)}
    if task_name == "vessels":
        scores.update(dice=metrics["dice"], dice_per_image=metrics.get("dice_per_image", float("nan")))
    else:
        error = metrics["mre"] * HRF_FACTOR  # back to the bundled photographs' pixels
        scores.update(mre_px=error, mre_disc_diameters=error / args.disc_diameter)
    return scores


def finetune_all(args: argparse.Namespace, encoders: dict[str, str | None], sets: dict[str, Any],
                 tasks: Sequence[str]) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    done: dict[tuple[str, str, int, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="label-eff-") as scratch:
        for task_name in tasks:
            site, test = sets[task_name]["site"], sets[task_name]["test"]
            for count in args.label_counts:
                n = len(site) if count == "all" else min(int(count), len(site))
                for seed in args.seed_list:
                    chosen = random.Random(seed).sample(site, n)
                    for arm, encoder in encoders.items():
                        started = time.perf_counter()
                        key = (task_name, arm, n, seed)  # "all" may be no more than "8": the same run
                        if key not in done:
                            done[key] = finetune_once(task_name, encoder, chosen, test, seed, args, Path(scratch))
                            done[key]["seconds"] = round(time.perf_counter() - started, 1)
                        scores = dict(done[key])
                        runs.setdefault(task_name, {}).setdefault(arm, {}).setdefault(str(count), []).append(
                            {"seed": seed, "labelled": n, **{k: round(v, 4) for k, v in scores.items()}})
                        headline = scores.get("dice", scores.get("mre_px"))
                        print(f"  {task_name} {arm} labels={count}({n}) seed={seed}: {headline:.4f} "
                              f"({scores['seconds']} s)", flush=True)
    return runs


# --- summary, plot -------------------------------------------------------------------------------------


def summarise(runs: dict[str, Any]) -> dict[str, Any]:
    """Mean and standard deviation over seeds per task, arm and label count."""
    keys = {"vessels": "dice", "disc": "mre_px"}
    out: dict[str, Any] = {}
    for task_name, arms in runs.items():
        for arm, counts in arms.items():
            for count, rows in counts.items():
                values = [r[keys[task_name]] for r in rows]
                out.setdefault(task_name, {}).setdefault(arm, {})[count] = {
                    "metric": keys[task_name], "mean": round(float(np.mean(values)), 4),
                    "std": round(float(np.std(values)), 4), "seeds": len(values), "labelled": rows[0]["labelled"]}
    return out


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in ("vessels", "disc") if t in summary]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for axis, task_name in zip(axes[0], tasks, strict=True):
        for arm in ARMS:
            if arm not in summary[task_name]:
                continue
            points = sorted(summary[task_name][arm].values(), key=lambda p: p["labelled"])
            xs = [p["labelled"] for p in points]
            axis.errorbar(xs, [p["mean"] for p in points], yerr=[p["std"] for p in points], marker="o",
                          capsize=3, label=ARM_TITLES[arm])
        axis.set_xscale("log", base=2)
        ticks = sorted({p["labelled"] for arm in summary[task_name].values() for p in arm.values()})
        axis.set_xticks(ticks, [str(t) for t in ticks])
        axis.set_xlabel("labelled photographs at hospital-a")
        axis.set_ylabel("held-out vessel Dice" if task_name == "vessels" else "disc-centre error (px, 1752x1168)")
        axis.set_title("HRF vessels" if task_name == "vessels" else "HRF optic-disc centre")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ratios(summary: dict[str, Any], count: str) -> list[str]:
    lines = []
    vessels = summary.get("vessels", {})
    if count not in vessels.get("random_init", {}):
        count = next(iter(vessels.get("random_init", {"?": 0})))
    mean = {arm: vessels[arm][count]["mean"] for arm in vessels if count in vessels[arm]}
    pretrained = [arm for arm in ("federated_ssl", "centralized_ssl", "local_ssl") if arm in mean]
    if "random_init" in mean and pretrained:
        best = pretrained[0]
        ratio = mean[best] / max(mean["random_init"], 1e-9)
        lines.append(f"ratio {best} Dice / random-init Dice at {count} labels = {ratio:.3f} "
                     f"({mean[best]:.4f} vs {mean['random_init']:.4f})")
    if "federated_ssl" in mean and "local_ssl" in mean:
        lines.append(f"ratio federated_ssl Dice / local-only-SSL Dice at {count} labels = "
                     f"{mean['federated_ssl'] / max(mean['local_ssl'], 1e-9):.3f}")
    return lines


def targets(summary: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets at 4 labelled photographs (mean of the seeds)."""
    vessels = summary.get("vessels", {})
    mean = {arm: counts["4"]["mean"] for arm, counts in vessels.items() if "4" in counts}
    out: dict[str, Any] = {}
    if "federated_ssl" in mean and "random_init" in mean:
        gap = mean["federated_ssl"] - mean["random_init"]
        out["fed_minus_random_dice_at_4"] = round(gap, 4)
        out["fed_ge_random_plus_0.03"] = bool(gap >= 0.03)
    if "federated_ssl" in mean and "local_ssl" in mean:
        out["fed_minus_local_dice_at_4"] = round(mean["federated_ssl"] - mean["local_ssl"], 4)
        out["fed_ge_local"] = bool(mean["federated_ssl"] >= mean["local_ssl"])
    return out


def show_in_report(out: Path, run_dir: Path) -> None:
    """Copy the JSON and plot into a simulation's run folder and refresh its report's label-efficiency section."""
    import shutil

    from simulations.label_efficiency import append_label_efficiency_section

    run_dir.mkdir(parents=True, exist_ok=True)
    for name in (RESULT_NAME, PLOT_NAME):
        shutil.copyfile(out / name, run_dir / name)
    append_label_efficiency_section(run_dir)
    print(f"copied into {run_dir} (report.md shows them when it exists)")


# --- main ----------------------------------------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/label-efficiency"))
    parser.add_argument("--stage", choices=("all", "pretrain", "finetune", "report"), default="all",
                        help="all, or one stage (pretrain / finetune [--tasks] / report) to run them as "
                             "separate processes; each stage reads what the earlier ones wrote in --out")
    parser.add_argument("--tasks", default="vessels,disc")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--labels", default="2,4,8,all")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--ssl-batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    # Global views of 2-12 % of the photograph (about 50-125 px of a 438-px-wide one, shown at 64 px): near
    # the scale the vessel tiles are fine-tuned at (native), not the whole photograph squeezed into 64 px.
    parser.add_argument("--global-scale", default="0.02,0.12")
    parser.add_argument("--local-scale", default="0.004,0.02")
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--finetune-steps", type=int, default=50)
    parser.add_argument("--validations", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--disc-diameter", type=float, default=190.0,
                        help="HRF's mean optic-disc diameter in the bundled pixels (expert A: about 190)")
    parser.add_argument("--report-into", type=Path, default=None, metavar="RUN_DIR",
                        help="also copy the JSON and plot into this `visionfm simulate` run folder and show them "
                             "in its report.md")
    parser.add_argument("--smoke-federated", action="store_true", help="in --smoke, also run the Ray simulation")
    add_smoke_flag(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.labels, args.rounds, args.local_steps = "0", "2,4", 1, 1
        args.finetune_steps, args.validations, args.ssl_batch, args.image_size = 2, 1, 4, 32
        args.tasks = "vessels,disc"
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    args.label_counts = [c.strip() for c in args.labels.split(",")]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    print_cpu()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    test_names = held_out_names()
    data = out / "pretrain-data"
    images = write_pretraining_folder(data, test_names, limit=9 if args.smoke else None)
    scenario = write_scenario(out / "scenario.toml", data, args)
    if args.stage in ("all", "pretrain"):
        pretrain(scenario, out, args.arms.split(","), args.smoke, args.smoke_federated)
    if args.stage in ("all", "finetune"):
        pretrained = pretrained_encoders(out)
        encoders: dict[str, str | None] = {"random_init": None}
        encoders.update({arm: info["encoder"] for arm, info in pretrained.items()})
        encoders = {arm: encoders[arm] for arm in ARMS if arm in encoders and arm in args.arms.split(",")}
        sets = labelled_sets(scenario, test_names, test_limit=2 if args.smoke else None)
        tasks = args.tasks.split(",")
        runs = finetune_all(args, encoders, sets, tasks)
        for task_name in tasks:  # one file per task and arm set: stages may run side by side
            name = f"runs-{task_name}-{'+'.join(encoders)}.json"
            (out / name).write_text(json.dumps(runs.get(task_name, {}), indent=1))
    if args.stage in ("all", "report"):
        runs = {}
        for task_name in ("vessels", "disc"):
            for path in sorted(out.glob(f"runs-{task_name}-*.json")):
                runs.setdefault(task_name, {}).update(json.loads(path.read_text()))
        summary = summarise(runs)
        pretrained = pretrained_encoders(out)
        report = {
            "cpu": cpu_model(),
            "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
            "data": {"pretraining_images": images, "test_images": sorted(test_names), "working_width_px": WIDTH,
                     "hospital_a_labelled": {t: next(iter(arms.values())).get("all", [{}])[0].get("labelled")
                                             for t, arms in runs.items() if arms}},
            "pretraining": pretrained,
            "summary": summary,
            "targets_at_4_labels": targets(summary),
            "runs": runs,
            "seconds_this_process": round(time.perf_counter() - started, 1),
        }
        (out / RESULT_NAME).write_text(json.dumps(report, indent=1, default=str) + "\n")
        plot(summary, out / PLOT_NAME)
        print(json.dumps(summary, indent=1))
        for line in ratios(summary, "4"):
            print(line)
        if report["targets_at_4_labels"]:
            print("targets at 4 labels:", json.dumps(report["targets_at_4_labels"]))
        print(f"wrote {out / RESULT_NAME} and {out / PLOT_NAME}")
        if args.report_into is not None:
            show_in_report(out, args.report_into)
    elif args.stage != "all":
        print(f"ratio n/a: stage {args.stage} done; run --stage report for the ratios")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
