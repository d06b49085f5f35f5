"""docs/CONFIG.md, generated: every run-config key with its type, default, meaning and its other names.

    python -m simulations.config_reference --write     # regenerate docs/CONFIG.md
    python -m simulations.config_reference             # print it

One name per concept: a run-config key (`num-rounds`) is also its job field or `[run-config]` entry, its
scenario `[run]` entry and its `visionfm simulate` flag (`--num-rounds`). The reference is built from the
code, so it cannot drift: `RunConfig`'s fields (and the comment lines above each in
visionfm_core/run_config.py), the DINO/iBOT (`ssl.*`) and DP-SGD (`privacy.*`) settings, the simulate
command's options and the job file's fields. tests/unit/core/test_config_reference.py fails when the
committed file differs from what this module generates.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import typer

from server.ops.jobs import DEPRECATED_FIELDS, FIELD_KEYS
from simulations.cli import app as simulations_app
from strategies.protocol.dp_config import DPConfig
from visionfm_core.run_config import RunConfig
from visionfm_core.ssl.config import SSLConfig

OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"
REGENERATE = "python -m simulations.config_reference --write"
# Meanings of keys the code leaves without a comment (a comment above the field in the code wins).
MEANINGS = {
    "num-rounds": "federated pretraining rounds",
    "local-steps": "local optimisation steps per site per round",
    "batch-size": "images per local step",
    "arch": "encoder size: nano, micro (tests), mini, tiny, small, base, large",
    "image-size": "input size in pixels (global crops)",
    "patch-size": "ViT patch size in pixels",
    "modalities": "the global model's modalities, comma-separated (one encoder each)",
    "objective": "self-supervised objective: dino or ibot",
    "teacher-ema": "with teacher-sync = ema: teacher <- teacher-ema x teacher + (1 - teacher-ema) x global student",
    "share-head": "send the projection head with the backbone (false: the head stays on the site)",
    "trim-beta": "trimmed-mean: fraction trimmed at each end",
    "byzantine": "krum / multi-krum: number of sites assumed malicious",
    "max-update-norm": "bound on each site's update L2 norm (0 = off)",
    "secagg-threshold": "SecAgg+: fraction of a modality's sites needed to unmask its sum",
    "secagg-clip-range": "SecAgg+: values are clipped to +-this before quantisation",
    "central-dp-noise": "site-level DP: noise multiplier of the server's Gaussian noise",
    "central-dp-delta": "site-level DP: delta of the reported (epsilon, delta)",
    "min-sites": "replies a round needs to go on (fewer fails the round)",
    "round-timeout": "seconds a round waits for the slowest site",
    "eval-every": "evaluate the global encoders every this many rounds",
    "knn-k": "neighbours of the k-NN probe",
    "val-fraction": "fraction of each site's images held out for its validation split",
    "seed": "random seed (partition, initial weights, training)",
    "device": "auto, cpu, cuda or cuda:N",
    "client-threads": "torch threads per site (0: torch's choice)",
    "num-workers": "DataLoader worker processes per site",
    "out-dir": "the run folder (checkpoints, metrics, report)",
    "progress": "show a live progress display",
    "finetune-epochs": "local fine-tuning epochs per round",
    "finetune-lr": "fine-tuning learning rate (0: the task's default)",
    "finetune-layer-decay": "fine-tuning layer-wise lr decay of the encoder (0: the task's default)",
    "finetune-min-steps": "least optimiser steps per site over all fine-tuning rounds (-1: the task's default)",
    "finetune-batch-size": "fine-tuning images per step",
    "finetune-server-lr": "the server's step along the sites' averaged fine-tuning update (1: plain FedAvg)",
    "finetune-encoder": "fine-tuning: the global encoder frozen or trained",
    "finetune-head": "fine-tuning: the task head shared (averaged) or personal (never sent)",
    "finetune-task": "classification, segmentation, landmarks, detection or regression",
    "finetune-mode": "classification: binary, multiclass or ordinal",
}
# Keys a scenario's [run] table cannot set: the scenario itself and what it derives.
NOT_IN_SCENARIO = {"scenario": "the scenario itself", "modalities": "from its sites", "phase": "internal"}
NOT_IN_JOB = {"scenario": "simulation only", "phase": "internal", "out-dir": "runs/<job name>"}
# CLI options whose name differs from their key's (they take a folder, not the run config's string).
CLI_ALIASES = {"out": "out-dir"}


@dataclasses.dataclass(frozen=True)
class Row:
    key: str
    type: str
    default: str
    meaning: str
    cli: str
    job: str
    scenario: str


def field_comments(cls: type) -> dict[str, str]:
    """The comment lines directly above each field of a dataclass, and its inline comment."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    comments: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        index = node.lineno - 2
        while index >= 0 and lines[index].strip().startswith("#"):
            above.insert(0, lines[index].strip().lstrip("#").strip())
            index -= 1
        inline = lines[node.lineno - 1].partition("  #")[2].strip()
        text = " ".join([*above, inline]).strip()
        if text:
            comments[node.target.id] = text
    return comments


def docstring_entries(cls: type) -> dict[str, str]:
    """`name: text` entries of a class docstring (continuation lines indented)."""
    entries: dict[str, str] = {}
    current = None
    for line in (inspect.getdoc(cls) or "").splitlines():
        match = re.match(r"^([a-z_]+): (.*)$", line)
        if match:
            current = match.group(1)
            entries[current] = match.group(2).strip()
        elif current and line.startswith("  "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def _type_name(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return text.replace("typing.", "")


def _default(value: Any) -> str:
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    return repr(value)


def cli_flags() -> dict[str, str]:
    """run-config key -> its `visionfm simulate` option (hidden, deprecated options left out)."""
    group = typer.main.get_command(simulations_app)
    assert isinstance(group, click.Group)
    command = group.commands["simulate"]
    keys = {f.name for f in dataclasses.fields(RunConfig)}
    flags: dict[str, str] = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.hidden or param.name is None:
            continue
        key = CLI_ALIASES.get(param.name, param.name.replace("_", "-"))
        if key.replace("-", "_") in keys:
            flags[key] = "/".join(o for o in param.opts if o.startswith("--"))
    return flags


def job_entry(key: str) -> str:
    if key in NOT_IN_JOB:
        return f"- ({NOT_IN_JOB[key]})"
    if key == "modalities":
        return "`[job] modalities` (a list)"
    fields = {config_key: job_key for job_key, config_key in FIELD_KEYS.items()}
    if key in fields:
        return f"`[job] {fields[key]}`"
    if key.startswith("privacy."):
        return f"`[privacy] {key.removeprefix('privacy.')}`"
    return f"`[run-config] {key}`"


def scenario_entry(key: str) -> str:
    return f"- ({NOT_IN_SCENARIO[key]})" if key in NOT_IN_SCENARIO else f"`[run] {key}`"


def run_rows() -> Iterator[Row]:
    comments = field_comments(RunConfig)
    flags = cli_flags()
    for field in dataclasses.fields(RunConfig):
        if field.name in ("ssl", "privacy"):
            continue
        key = field.name.replace("_", "-")
        meaning = comments.get(field.name) or MEANINGS.get(key, "")
        yield Row(key, _type_name(field.type), _default(field.default), meaning, f"`{flags[key]}`"
                  if key in flags else "-", job_entry(key), scenario_entry(key))


def nested_rows(prefix: str, cls: type, skip: set[str]) -> Iterator[Row]:
    meanings = {**docstring_entries(cls), **field_comments(cls)}
    for field in dataclasses.fields(cls):
        key = prefix + field.name.replace("_", "-")
        if field.name in skip:
            continue
        factory: Any = field.default_factory
        value = field.default if field.default is not dataclasses.MISSING else factory()
        yield Row(key, _type_name(field.type), _default(value), meanings.get(field.name, ""), "-",
                  job_entry(key), scenario_entry(key))


def _table(rows: list[Row]) -> list[str]:
    out = ["| key | type | default | meaning | `visionfm simulate` | job file | scenario |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        meaning = _cell(r.meaning)
        out.append(f"| `{r.key}` | {_cell(r.type)} | `{r.default}` | {meaning} | {r.cli} | {r.job} "
                   f"| {r.scenario} |")
    return out


def _cell(text: str) -> str:
    """Table-safe: pipes escaped, angle brackets as entities (Markdown would take `<modality>` for HTML)."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def render() -> str:
    run_level = {f.name for f in dataclasses.fields(RunConfig)}
    deprecated = ", ".join(f"`{old}` (use `{new}`)" for old, new in DEPRECATED_FIELDS.items())
    lines = [
        "# Settings reference",
        "",
        f"Generated by `{REGENERATE}` from the code; do not edit by hand.",
        "",
        "A run's settings are run-config keys. One key has one name everywhere: in a job file (a field of",
        "`[job]` for the few listed there, otherwise under `[run-config]`, DP-SGD settings under",
        "`[privacy]`), in a scenario's `[run]` table, in `flwr run --run-config`, and as the",
        "`visionfm simulate` option of the same name where there is one. Precedence in a simulation:",
        "defaults < scenario `[run]` < command-line options; in a deployment: defaults < job file.",
        "",
        f"Old names still read, with a deprecation note: the simulate option `--rounds` (use `--num-rounds`);"
        f" job fields {deprecated}.",
        "",
        "Not run-config keys (each hospital's own facts): a site's node config (`data-path`, `modalities`,",
        "`privacy-epsilon`, `privacy-delta`, `task-manifest`, `state-dir`), set through `visionfm-client",
        "join` options; see docs/DEPLOYMENT.md.",
        "",
        "## Run",
        "",
        *_table(list(run_rows())),
        "",
        "## DINO / iBOT (`ssl.*`)",
        "",
        "Keys of the self-supervised objective; a run-level key of the same name (`objective`, `batch-size`,",
        "`share-head`) wins over its `ssl.*` twin.",
        "",
        *_table(list(nested_rows("ssl.", SSLConfig, {f.replace("-", "_") for f in run_level}))),
        "",
        "## DP-SGD (`privacy.*`, used when `dp = true`)",
        "",
        *_table(list(nested_rows("privacy.", DPConfig, set()))),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"write {OUTPUT.relative_to(OUTPUT.parents[1])}")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        OUTPUT.write_text(text)
        print(f"wrote {OUTPUT}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
