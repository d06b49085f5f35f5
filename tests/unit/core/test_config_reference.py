"""docs/CONFIG.md is what `python -m simulations.config_reference --write` generates from the code."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from simulations.config_reference import OUTPUT, REGENERATE, render
from visionfm_core.run_config import RunConfig


def test_config_reference_is_current() -> None:
    assert OUTPUT.read_text() == render(), (
        f"docs/CONFIG.md is stale (a run-config key, its default, comment or option changed): regenerate it "
        f"with `{REGENERATE}` and commit the result")


def test_every_run_config_key_is_in_the_reference_with_its_default() -> None:
    text = render()
    for field in dataclasses.fields(RunConfig):
        if field.name in ("ssl", "privacy"):
            continue
        key = field.name.replace("_", "-")
        assert f"| `{key}` |" in text, key
    assert "| `num-rounds` | int | `3` |" in text
    assert "`--num-rounds`" in text and "`[job] num-rounds`" in text and "`[run] num-rounds`" in text
    assert "| `privacy.noise-multiplier` |" in text and "| `ssl.out-dim` |" in text


def test_the_old_simulate_option_rounds_is_read_with_a_deprecation_note(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from simulations.cli import app

    missing = tmp_path / "no-such-scenario.toml"
    result = CliRunner().invoke(app, ["simulate", "--rounds", "2", "--scenario", str(missing), "--out",
                                      str(tmp_path / "run")])
    assert "--rounds is deprecated: use --num-rounds" in result.output
    assert result.exit_code == 2 and "no-such-scenario" in result.output  # and it went on to the run itself
    help_text = CliRunner().invoke(app, ["simulate", "--help"]).output
    assert "--num-rounds" in help_text and "--rounds " not in help_text
