"""The `visionfm` command: `visionfm simulate` (a whole federation on one machine) and the single-site
commands of visionfm_core (pretrain, finetune, evaluate, predict, weights) where they are installed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from simulations.compare import SCORES, comparison_rows, finetune_rows, reference_rows, test_scores, write_comparison
from simulations.simulate import MODES, quiet_framework_logs, simulate
from visionfm_core.errors import VisionFMError

app = typer.Typer(help="visionfm-fed: federated ophthalmic foundation models (VisionFM) with Flower.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = Console(soft_wrap=True)  # never wrap or cut a line: paths must stay whole


@app.callback()
def _root() -> None:
    """visionfm-fed: federated ophthalmic foundation models (VisionFM) with Flower."""


def _register_core_commands() -> None:
    try:
        from visionfm_core.cli import register
    except ImportError:
        return
    register(app)


@app.command("simulate")
def simulate_command(
    scenario: Annotated[str, typer.Option(help="bundled scenario name (quick, default) or a TOML file")] = "default",
    mode: Annotated[str, typer.Option(help="federated | centralized | local | all (runs the three and compares)")]
    = "federated",
    out: Annotated[Path | None, typer.Option(help="run folder (default runs/<scenario>-<mode>)")] = None,
    sites: Annotated[int | None, typer.Option(help="number of sites, each holding every modality")] = None,
    partition: Annotated[str | None, typer.Option(help="iid | dirichlet (label skew) | quantity")] = None,
    alpha: Annotated[float | None, typer.Option(help="Dirichlet alpha: smaller = more skew")] = None,
    num_rounds: Annotated[int | None, typer.Option(help="federated (pretraining) rounds")] = None,
    rounds: Annotated[int | None, typer.Option(hidden=True, help="deprecated name of --num-rounds")] = None,
    local_steps: Annotated[int | None, typer.Option(help="local optimisation steps per round")] = None,
    objective: Annotated[str | None, typer.Option(help="dino | ibot")] = None,
    arch: Annotated[str | None, typer.Option(help="nano | micro | mini | tiny | small | base")] = None,
    image_size: Annotated[int | None, typer.Option(help="input size in pixels")] = None,
    patch_size: Annotated[int | None, typer.Option(help="ViT patch size")] = None,
    teacher_sync: Annotated[str | None, typer.Option(help="ema (FedEMA-style) | reset")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed (partition and training)")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    compile: Annotated[str | None, typer.Option(help="torch.compile the training steps: auto (on CUDA) | on | "
                                                     "off")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run folder from its last complete round")] = False,
    strategy: Annotated[str | None, typer.Option(help="fedavg | median | trimmed-mean | krum | multi-krum")] = None,
    max_update_norm: Annotated[float | None, typer.Option(help="bound each site's update to this L2 norm")] = None,
    update_norm_factor: Annotated[float | None, typer.Option(
        help="reject updates whose norm exceeds this x the round's median (default 4; 0 = off)")] = None,
    compression: Annotated[str | None, typer.Option(help="transport codec: none | fp16 | bf16 | int8")] = None,
    secure_aggregation: Annotated[bool | None, typer.Option(
        "--secure-aggregation/--no-secure-aggregation", help="SecAgg+: the server sees only sums")] = None,
    central_dp_clip: Annotated[float | None, typer.Option(help="site-level DP: clip each site's update")] = None,
    central_dp_noise: Annotated[float | None, typer.Option(help="site-level DP: server noise multiplier")] = None,
    dp: Annotated[bool, typer.Option("--dp", help="DP-SGD at every simulated site, in every phase (each site "
                                                  "within its own lifetime budget and ledger)")] = False,
    privacy_epsilon: Annotated[float | None, typer.Option(help="--dp: every simulated site's lifetime epsilon "
                                                                "(a scenario's per-site privacy-epsilon wins)")] = None,
    privacy_delta: Annotated[float | None, typer.Option(help="--dp: every simulated site's delta "
                                                              "(default 1e-5)")] = None,
    finetune_rounds: Annotated[int | None, typer.Option(help="federated fine-tuning rounds after pretraining")]
    = None,
    finetune_epochs: Annotated[int | None, typer.Option(help="local fine-tuning epochs per round")] = None,
    finetune_encoder: Annotated[str | None, typer.Option(help="fine-tuning: frozen | trained encoder")] = None,
    finetune_head: Annotated[str | None, typer.Option(help="fine-tuning: shared (averaged) | personal head")]
    = None,
    finetune_data: Annotated[str | None, typer.Option(help="fine-tune on a bundled task set instead of the "
                                                          "scenario's labels: hrf-vessels (segmentation), "
                                                          "hrf-disc (landmarks), idrid-disc (detection)")] = None,
    init_encoders: Annotated[Path | None, typer.Option(help="fine-tune these <modality>.safetensors encoders "
                                                            "instead of pretraining")] = None,
    tracking: Annotated[str | None, typer.Option(help="log config, per-round metrics and final encoders to "
                                                 "mlflow (OUT/mlruns) or tensorboard (OUT/tensorboard)")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="an MLflow tracking URI or TensorBoard log folder "
                                                     "instead of the run folder's (a server only if named)")] = None,
    ray_address: Annotated[str | None, typer.Option(help="HOST:PORT of a running Ray cluster's head to run the "
                                                         "simulated sites on (default: a Ray started here)")]
    = None,
    fraction_train: Annotated[float | None, typer.Option(help="share of the sites each round trains (seeded)")]
    = None,
    fraction_evaluate: Annotated[float | None, typer.Option(help="share of the sites each round evaluates")]
    = None,
    round_deadline: Annotated[float | None, typer.Option(help="seconds a round waits for its sites (0 = no "
                                                               "deadline); late replies are dropped")] = None,
    verbose: Annotated[bool, typer.Option(help="show Flower's and Ray's logs")] = False,
) -> None:
    """Simulate a federation of hospitals on this machine and write checkpoints, metrics, plots and a report."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        quiet_framework_logs()
    if rounds is not None:
        console.print("[yellow]note:[/] --rounds is deprecated: use --num-rounds (the run-config, job and "
                      "scenario key is num-rounds)")
        num_rounds = rounds if num_rounds is None else num_rounds
    overrides: dict[str, Any] = {
        "num-rounds": num_rounds, "local-steps": local_steps, "objective": objective, "arch": arch,
        "image-size": image_size, "patch-size": patch_size, "teacher-sync": teacher_sync, "seed": seed,
        "device": device, "compile": compile, "progress": True, "resume": resume, "finetune-rounds": finetune_rounds,
        "finetune-epochs": finetune_epochs, "finetune-encoder": finetune_encoder, "finetune-head": finetune_head,
        "finetune-data": finetune_data, "init-encoders": str(init_encoders) if init_encoders else None,
        "strategy": strategy,
        "max-update-norm": max_update_norm, "update-norm-factor": update_norm_factor,
        "compression": compression, "secure-aggregation": secure_aggregation,
        "central-dp-clip": central_dp_clip, "central-dp-noise": central_dp_noise,
        "tracking": tracking, "tracking-uri": tracking_uri,
        "fraction-train": fraction_train, "fraction-evaluate": fraction_evaluate, "round-deadline": round_deadline,
    }
    if dp:
        overrides["dp"] = True
    scenario_overrides: dict[str, Any] = {"sites": sites}
    if privacy_epsilon is not None or privacy_delta is not None:
        scenario_overrides["privacy"] = {k: v for k, v in (("epsilon", privacy_epsilon), ("delta", privacy_delta))
                                         if v is not None}
    if partition is not None or alpha is not None:
        from strategies.protocol.scenario import load_scenario

        base = load_scenario(scenario)
        scenario_overrides["partition"] = {"kind": partition or base.partition,
                                           "alpha": alpha if alpha is not None else base.alpha, "seed": base.seed}
    modes = MODES if mode == "all" else (mode,)
    root = out or Path(f"runs/{Path(scenario).stem}")
    logs = {}
    reference: dict[str, dict[str, float]] = {}
    try:
        for each in modes:
            target = root / each if (mode == "all" or out is None) else root
            console.print(f"[bold]visionfm simulate[/] scenario={scenario} mode={each} → {target}")
            outcome = simulate(scenario, each, target, overrides, scenario_overrides,
                               ray_address if each == "federated" else None)
            logs[each] = outcome.metrics
            _print_scores(each, outcome.metrics, outcome.reference)
            _print_finetune_scores(each, outcome.metrics)
            reference = outcome.reference
            console.print(f"  {each} finished in {outcome.seconds:.0f}s: report {outcome.out_dir / 'report.md'}")
    except VisionFMError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    if len(logs) > 1:
        path = write_comparison(root, comparison_rows(logs) + reference_rows(reference), finetune_rows(logs))
        console.print(f"comparison: {path}")


def _print_scores(mode: str, log: Any, reference: dict[str, dict[str, float]]) -> None:
    first, last = test_scores(log, 0), test_scores(log)
    table = Table(title=f"{mode}: held-out test split, frozen encoder (round 0 → last)",
                  caption="colour statistics: the same probes on 6 numbers per image (channel means and "
                          "standard deviations), no encoder")
    for column in ("arm", "modality", "k-NN acc", "k-NN AUC", "linear acc", "linear AUC"):
        table.add_column(column)
    for arm, per_modality in sorted(last.items()):
        for modality, scores in sorted(per_modality.items()):
            base = first.get(arm, {}).get(modality, {})
            table.add_row(arm, modality, *(f"{base.get(k, float('nan')):.3f} → {scores.get(k, float('nan')):.3f}"
                                           for k in SCORES))
    for modality, scores in sorted(reference.items()):
        table.add_row("colour statistics", modality, *(f"{scores[k]:.3f}" for k in SCORES), style="dim")
    console.print(table)


def _print_finetune_scores(mode: str, log: Any) -> None:
    """The last fine-tuning round's scores: each site on its validation split, the server on held-out data."""
    from strategies.protocol.task_models import HEADLINE

    rows = [r for r in log.rows if r["phase"] == "finetune-evaluate"]
    if not rows:
        return
    last = max(int(r["round"]) for r in rows)
    rows = sorted((r for r in rows if int(r["round"]) == last),
                  key=lambda r: (not str(r["site"]).endswith("global-test"), r["site"]))
    keys = [k for task in HEADLINE.values() for k in task if any(k in r for r in rows)]
    table = Table(title=f"{mode}: fine-tuned model, fine-tune round {int(rows[0]['finetune_round'])}",
                  caption="global-test: held-out data; a site: its own validation split")
    for column in ("site", "modality", *keys):
        table.add_column(column)
    for row in rows:
        table.add_row(str(row["site"]), str(row["modality"]),
                      *(f"{row[k]:.3f}" if isinstance(row.get(k), (int, float)) else "" for k in keys))
    console.print(table)


_register_core_commands()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
