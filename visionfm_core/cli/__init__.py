"""The single-site `visionfm` commands: pretrain, finetune, evaluate, predict and `weights`.

`register(app)` adds them to a typer app; the root `visionfm` command (simulations/cli.py) mounts them
next to `visionfm simulate`.
"""

from __future__ import annotations

import typer

from visionfm_core.cli.finetune import evaluate_command, finetune_command, predict_command
from visionfm_core.cli.pretrain import pretrain_command
from visionfm_core.cli.weights import weights_app


def register(app: typer.Typer) -> None:
    """Add pretrain, finetune, evaluate, predict and the `weights` group to ``app``."""
    app.command("pretrain")(pretrain_command)
    app.command("finetune")(finetune_command)
    app.command("evaluate")(evaluate_command)
    app.command("predict")(predict_command)
    app.add_typer(weights_app, name="weights")


def build_app() -> typer.Typer:
    """A stand-alone app with just these commands (tests, or embedding elsewhere)."""
    app = typer.Typer(help="visionfm single-site commands", no_args_is_help=True, pretty_exceptions_enable=False)
    register(app)
    return app
