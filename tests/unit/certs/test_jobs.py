"""Job files become Flower run-config overrides; keys the app does not declare are caught up front."""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import pytest

from server.ops.deploy_app import write_deployment_app
from server.ops.jobs import app_config_keys, check_against_app, load_job, toml_overrides
from strategies.protocol.dp_config import DPConfig
from visionfm_core.errors import ConfigError
from visionfm_core.pretraining import encoder_spec, ssl_config
from visionfm_core.run_config import RunConfig

FIXTURE_APP = Path(__file__).resolve().parents[2] / "integration" / "deployment" / "fixture_app"

JOB = """
[job]
name = "fundus-pretrain"
app = "{app}"
phases = ["pretrain"]
modalities = ["Fundus", "cfp"]
num-rounds = 5
strategy = "fedavg"
min-sites = 2
round-timeout = 600.5

[privacy]
noise-multiplier = 1.1
max-grad-norm = 2

[run-config]
local-steps = 3
"ssl.out-dim" = 128
"""


def _job(tmp_path: Path, text: str = JOB) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(text.replace("{app}", str(FIXTURE_APP)))
    return path


def test_the_old_job_field_rounds_is_read_with_a_deprecation_note(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        job = load_job(_job(tmp_path, JOB.replace("num-rounds = 5", "rounds = 7")))
    assert job.overrides["num-rounds"] == 7 and "rounds" not in job.overrides
    assert "job.rounds is deprecated, use job.num-rounds" in caplog.text


def test_job_fields_map_to_run_config_keys(tmp_path: Path) -> None:
    job = load_job(_job(tmp_path))
    assert job.name == "fundus-pretrain" and job.app == FIXTURE_APP and job.phases == ["pretrain"]
    assert job.overrides == {
        "modalities": "fundus,fundus",
        "num-rounds": 5,
        "strategy": "fedavg",
        "min-sites": 2,
        "round-timeout": 600.5,
        "privacy.noise-multiplier": 1.1,
        "privacy.max-grad-norm": 2,
        "local-steps": 3,
        "ssl.out-dim": 128,
    }


def test_fine_tuning_is_asked_for_with_its_rounds(tmp_path: Path) -> None:
    text = JOB.replace('phases = ["pretrain"]', 'phases = ["pretrain", "fine-tune"]')
    job = load_job(_job(tmp_path, text.replace("local-steps = 3", "local-steps = 3\nfinetune-rounds = 2")))
    assert job.phases == ["pretrain", "fine-tune"] and job.overrides["finetune-rounds"] == 2


def test_overrides_round_trip_through_toml(tmp_path: Path) -> None:
    overrides: dict[str, str | int | float | bool] = {
        "num-rounds": 5,
        "out-dir": '/runs/a "quoted" name',
        "flag": True,
        "ssl.out-dim": 1.5,
    }
    assert tomllib.loads(toml_overrides(overrides)) == overrides


def test_app_keys_are_checked_before_flower_sees_them(tmp_path: Path) -> None:
    job = load_job(_job(tmp_path))
    assert job.app is not None
    check_against_app(job.app, {"num-rounds": 3, "min-sites": 2, "round-timeout": 10.0, "out-dir": "/x"})
    with pytest.raises(ConfigError) as err:
        check_against_app(job.app, job.overrides)
    assert err.value.key == "modalities"


def test_the_deployment_app_declares_every_run_config_key(tmp_path: Path) -> None:
    job = load_job(_job(tmp_path, JOB.replace('app = "{app}"\n', "")))
    assert job.app is None  # the default: the generated, configuration-only deployment app
    app = write_deployment_app(tmp_path / "app")
    check_against_app(app, {**job.overrides, "resume": True, "out-dir": "/runs/x", "dp": True})
    declared = app_config_keys(app)
    # The declared defaults are the package's defaults: same run config, same SSL setup, same encoder.
    from_app = RunConfig.from_flat(declared)
    assert from_app.replace(ssl={}, privacy={}) == RunConfig()
    assert DPConfig.from_dict(from_app.privacy) == DPConfig()
    assert ssl_config(from_app) == ssl_config(RunConfig()) and encoder_spec(from_app) == encoder_spec(RunConfig())
    config = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    assert config == {"serverapp": "server.federation.app:app", "clientapp": "client.app:app"}
    assert "phase" not in declared  # internal: set by the ServerApp per phase
    with pytest.raises(ConfigError) as err:
        check_against_app(app, {"privacy.target-epsilon": 8})  # the site sets its budget, not the job
    assert err.value.key == "privacy.target-epsilon"


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda t: t.replace('name = "fundus-pretrain"', 'name = "../escape"'), "job.name"),
        (lambda t: t.replace('phases = ["pretrain"]', 'phases = ["train"]'), "job.phases"),
        (lambda t: t.replace('phases = ["pretrain"]', 'phases = ["fine-tune"]'), "job.phases"),
        (lambda t: t.replace('phases = ["pretrain"]', 'phases = ["pretrain", "fine-tune"]'), "job.phases"),
        (lambda t: t.replace("local-steps = 3", "local-steps = 3\nfinetune-rounds = 2"), "job.phases"),
        (lambda t: t.replace("num-rounds = 5", "num-rounds = 5\nepochs = 3"), "job.epochs"),
        (lambda t: t.replace("num-rounds = 5", "num-rounds = 5\nrounds = 5"), "job.rounds"),
        (lambda t: t.replace('modalities = ["Fundus", "cfp"]', 'modalities = ["x-ray"]'), "modality"),
        (lambda t: t + "\n[extra]\na = 1\n", "extra"),
        (lambda t: t.replace("local-steps = 3", "local-steps = [1, 2]"), "run-config.local-steps"),
    ],
)
def test_invalid_jobs_name_the_key(tmp_path: Path, edit: object, key: str) -> None:
    assert callable(edit)
    with pytest.raises(ConfigError) as err:
        load_job(_job(tmp_path, edit(JOB)))
    assert err.value.key == key


def test_app_without_pyproject_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pyproject"):
        check_against_app(tmp_path / "nowhere", {})


def test_the_coordinator_checks_a_jobs_values_before_submitting_it(tmp_path: Path) -> None:
    from server.ops.deploy_app import check_run_config
    from server.ops.runs import submit

    job = load_job(_job(tmp_path, JOB.replace('app = "{app}"\n', "").replace(
        "local-steps = 3", "local-steps = 3\nfinetune-input-aspect = \"oct=550:224\"")))
    assert check_run_config(job.overrides).finetune_aspect_setting("oct") == "550:224"
    job.overrides["finetune-input-aspect"] = "oct=550:0"
    with pytest.raises(ConfigError) as err:
        submit(tmp_path / "no-coordinator", job)  # refused before it looks for a running coordinator
    assert err.value.key == "finetune-input-aspect"
