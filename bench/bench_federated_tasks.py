"""Federated fine-tuning of segmentation, landmarks and detection on the bundled sets (issue #3).

    .venv/bin/python bench/bench_federated_tasks.py [--tasks hrf-vessels,hrf-disc,idrid-disc]
        [--rounds 6] [--epochs 2] [--sites 3] [--out results.json]

For each bundled task set (simulations/task_sets.py), three arms start from the same randomly
initialised micro ViT and the same seeded task head, and each makes the same number of passes over
its own data (rounds x local epochs):
- federated: a real `visionfm simulate` run (Flower's simulation engine) with `--sites` fundus
  hospitals holding equal shares of the set; the averaged encoder and head are scored every round;
- centralized: every hospital's training images pooled at one site;
- local: each hospital alone on its own share (mean, worst and best over the hospitals).
All arms train with the code path a site runs (`client/finetuning.py`: same optimiser, schedule,
augmentation, no model selection) and are scored on the set's held-out quarter of the photographs, which
nothing trains or selects on. Headline metrics: vessel Dice (higher is better), optic-disc mean radial
error in the bundled images' pixels (lower is better), optic-disc box mAP@0.5 (higher is better).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.finetuning import HEADLINE, build_task_model, new_tuner, task_adapter  # noqa: E402
from client.site import load_site_tasks  # noqa: E402
from server.finetune_phase import resolve_finetune_task  # noqa: E402
from simulations.simulate import simulate  # noqa: E402
from simulations.task_sets import TASK_SETS, load_task_set  # noqa: E402
from visionfm_core.models.checkpoint import encoder_metadata, save_encoder  # noqa: E402
from visionfm_core.models.encoders import EncoderSpec, create_encoder  # noqa: E402
from visionfm_core.run_config import RunConfig  # noqa: E402
from visionfm_core.runtime import seed_everything  # noqa: E402
from visionfm_core.tasks.data import Preprocess  # noqa: E402
from visionfm_core.tasks.samples import TaskSample  # noqa: E402

SIZES = {"hrf-vessels": 256, "hrf-disc": 128, "idrid-disc": 128}
LOWER_IS_BETTER = {"mre"}


def scenario_file(folder: Path, sites: int) -> Path:
    lines = ['name = "bench-tasks"', "[datasets]", 'fundus = "retinamnist"']
    for index in range(sites):
        lines += ["[[sites]]", f'name = "hospital-{chr(ord("a") + index)}"', 'modalities = ["fundus"]']
    path = folder / "scenario.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def random_encoder(folder: Path, size: int, seed: int) -> Path:
    """The arms' common starting point: a seeded, untrained micro ViT saved as `fundus.safetensors`."""
    folder.mkdir(parents=True)
    seed_everything(seed)
    spec = EncoderSpec("micro", size, 16)
    save_encoder(folder / "fundus.safetensors", create_encoder(spec).state_dict(),
                 encoder_metadata(spec, "fundus", source_format="scratch"))
    return folder


def run_overrides(name: str, args: argparse.Namespace, encoders: Path) -> dict[str, Any]:
    return {"arch": "micro", "patch-size": 16, "image-size": SIZES[name], "modalities": "fundus",
            "num-rounds": 1, "local-steps": 1, "finetune-rounds": args.rounds, "finetune-epochs": args.epochs,
            "finetune-batch-size": args.batch, "finetune-lr": args.lr, "finetune-data": name,
            "init-encoders": str(encoders), "seed": args.seed}


def train_alone(cfg: RunConfig, encoders: Path, train: list[TaskSample], test: list[TaskSample]) -> dict[str, float]:
    """One site training on `train` for rounds x epochs passes, as `finetune_round` does, then tested."""
    from safetensors.torch import load_file

    device = torch.device("cpu")
    tuner = new_tuner(cfg, "fundus", device)
    shared = {f"backbone.{k}": v for k, v in load_file(str(encoders / "fundus.safetensors")).items()}
    model = build_task_model(tuner, cfg, shared, None)
    preprocess = Preprocess.for_modality("fundus", cfg.image_size)
    seed_everything(cfg.seed)
    loader = tuner.loader(train, preprocess, train=True)
    epochs = cfg.finetune_rounds * cfg.finetune_epochs
    state = tuner.init_state(model, epochs * len(loader), start_step=0, steps_per_epoch=len(loader))
    tuner.train_epochs(state, loader, epochs)
    return tuner.evaluate(model, tuner.loader(test, preprocess, train=False))


def bench_task(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    task_set = load_task_set(name)
    folder = work / name
    folder.mkdir()
    scenario = scenario_file(folder, args.sites)
    encoders = random_encoder(folder / "init", SIZES[name], args.seed)
    overrides = run_overrides(name, args, encoders)
    headline = HEADLINE[task_set.task][0]
    result: dict[str, Any] = {"task": task_set.task, "metric": headline, "image_size": SIZES[name],
                              "pool": len(task_set.pool), "test": len(task_set.test)}

    started = time.perf_counter()
    outcome = simulate(str(scenario), "federated", folder / "federated", overrides=overrides)
    pooled = sorted((r for r in outcome.metrics.rows if r["site"] == "global-test"), key=lambda r: r["round"])
    result["federated"] = {"per_round": [round(r[headline], 4) for r in pooled], "seconds": round(
        time.perf_counter() - started, 1)}

    cfg = resolve_finetune_task(RunConfig.from_flat(json.loads((folder / "federated" / "config.json").read_text())))
    sites = [load_site_tasks({"partition-id": i}, cfg, lambda m: task_adapter(cfg, m))["fundus"]
             for i in range(args.sites)]
    result["site_train_images"] = [len(s.train) for s in sites]
    started = time.perf_counter()
    central = train_alone(cfg, encoders, [s for site in sites for s in site.train], task_set.test)
    result["centralized"] = {"test": round(central[headline], 4), "seconds": round(time.perf_counter() - started, 1)}
    local = [train_alone(cfg, encoders, site.train, task_set.test)[headline] for site in sites]
    worst, best = (max(local), min(local)) if headline in LOWER_IS_BETTER else (min(local), max(local))
    result["local"] = {"per_site": [round(v, 4) for v in local], "mean": round(sum(local) / len(local), 4),
                       "worst": round(worst, 4), "best": round(best, 4)}
    result["config"] = {k: overrides[k] for k in ("finetune-rounds", "finetune-epochs", "finetune-batch-size",
                                                  "finetune-lr", "image-size")}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASK_SETS))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    results: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "out"}}
    with tempfile.TemporaryDirectory(prefix="visionfm-bench-tasks-") as work:
        for name in args.tasks.split(","):
            results[name] = entry = bench_task(name.strip(), args, Path(work))
            fed = entry["federated"]["per_round"][-1]
            print(f"{name:12s} {entry['metric']:6s} federated {fed:.4f} (rounds {entry['federated']['per_round']}) "
                  f"centralized {entry['centralized']['test']:.4f} local mean {entry['local']['mean']:.4f} "
                  f"[{entry['local']['worst']:.4f} worst, {entry['local']['best']:.4f} best]", flush=True)
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
