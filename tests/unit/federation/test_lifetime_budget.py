"""A site's budget holds across runs: the real ClientApp, real Flower messages and contexts, one work
folder. A run, its `--resume` (a new Flower run) and a new job spend from one ledger; the round that
would exceed the lifetime budget is refused before it trains; a damaged ledger stops the site."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from typer.testing import CliRunner

import simulations
from client.app import app as client_app
from client.cli import app as cli_app
from client.privacy.accountant import epsilon_of
from client.privacy.ledger import summarise_ledgers
from client.site import load_site_data
from strategies.protocol.records import arrays_to_record, record_to_numpy
from visionfm_core.pretraining import initial_global_arrays
from visionfm_core.run_config import RunConfig

OCT = Path(simulations.__file__).parent / "data" / "oct2017_val"
SIGMA, BATCH = 1.0, 4
CFG = RunConfig(num_rounds=3, local_steps=1, batch_size=4, arch="nano", image_size=32, patch_size=8,
                modalities="oct", knn_k=3, dp=True,
                ssl={"out_dim": 32, "head_hidden_dim": 32, "head_bottleneck_dim": 16, "local_crops": 0},
                privacy={"noise_multiplier": SIGMA, "expected_batch_size": BATCH, "center": "fixed"})


@pytest.fixture()
def work(tmp_path: Path) -> Path:
    data = tmp_path / "images"
    for src in sorted(OCT.glob("val/*/*.jpeg"))[:16]:
        (data / src.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, data / src.parent.name / src.name)
    return tmp_path


def _node_config(work: Path, epsilon: float, data: str = "images") -> dict[str, str | float]:
    return {"data-path": str(work / data), "modalities": "oct", "state-dir": str(work / "site" / "state"),
            "privacy-epsilon": epsilon, "privacy-delta": 1e-5}


def _train(work: Path, run: int, server_round: int, epsilon: float, data: str = "images") -> Message:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = run, run, 7
    context = Context(run_id=run, node_id=7, node_config=_node_config(work, epsilon, data), state=RecordDict(),
                      run_config={})
    config = ConfigRecord({**CFG.to_flat(), "server-round": server_round})
    request = Message(RecordDict({"arrays": arrays_to_record(initial_global_arrays(CFG)), "config": config}),
                      dst_node_id=7, message_type=MessageType.TRAIN)
    return client_app(request, context)


def _epsilon_after(work: Path, rounds: int) -> float:
    train = len(load_site_data(_node_config(work, 1.0), CFG)["oct"].train)
    return epsilon_of([(SIGMA, BATCH / train, rounds)], 1e-5)


def test_a_run_its_resume_and_a_new_job_spend_one_lifetime_budget(work: Path) -> None:
    budget = (_epsilon_after(work, 2) + _epsilon_after(work, 3)) / 2  # room for two rounds, not three
    first = _train(work, run=101, server_round=1, epsilon=budget)
    assert not first.has_error(), first.error.reason if first.has_error() else ""
    assert first.content.metric_records["metrics"]["oct/epsilon"] == pytest.approx(_epsilon_after(work, 1), rel=1e-6)
    # `visionfm-server run ... --resume` is a new Flower run: a fresh state folder, the same ledger.
    resumed = _train(work, run=202, server_round=2, epsilon=budget)
    assert resumed.content.metric_records["metrics"]["oct/epsilon"] == pytest.approx(_epsilon_after(work, 2), rel=1e-6)
    assert (work / "site" / "state" / "run-202").is_dir()
    # A new job: the lifetime budget is spent, so its first round is refused before training.
    refused = _train(work, run=303, server_round=1, epsilon=budget)
    metrics = refused.content.metric_records["metrics"]
    assert metrics["oct/budget-exhausted"] == 1.0
    assert all(record_to_numpy(record) == {} for record in refused.content.array_records.values())
    # The same images copied elsewhere are the same dataset.
    shutil.copytree(work / "images", work / "moved")
    again = _train(work, run=404, server_round=1, epsilon=budget, data="moved")
    assert again.content.metric_records["metrics"]["oct/budget-exhausted"] == 1.0
    (spending,) = summarise_ledgers(work / "site" / "privacy")
    assert spending.modality == "oct" and spending.entries == 2
    assert [r.run for r in spending.runs] == [101, 202]
    assert spending.epsilon_spent == pytest.approx(_epsilon_after(work, 2), rel=1e-6)
    assert spending.remaining == pytest.approx(budget - spending.epsilon_spent)
    # Hospital IT reads it with `visionfm-client audit --privacy`.
    shown = CliRunner().invoke(cli_app, ["audit", "--privacy", "--work", str(work / "site")])
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.output.split())
    assert f"epsilon spent {spending.epsilon_spent:.4g} of {budget:g}" in text
    assert f"remaining {budget - spending.epsilon_spent:.4g}" in text
    assert "run 101: pretrain, 1 round(s)" in text and "run 202: pretrain" in text and "run 303" not in text


def test_a_damaged_ledger_stops_the_site_with_a_clear_message(work: Path) -> None:
    assert not _train(work, run=1, server_round=1, epsilon=50.0).has_error()
    (ledger_file,) = (work / "site" / "privacy").glob("*.jsonl")
    ledger_file.write_text(ledger_file.read_text().replace('"steps":1', '"steps":0'))
    reply = _train(work, run=2, server_round=1, epsilon=50.0)
    assert reply.has_error()
    assert "PrivacyLedgerDamaged" in reply.error.reason and "restores it" in reply.error.reason
    assert str(work) not in reply.error.reason
    shown = CliRunner().invoke(cli_app, ["audit", "--privacy", "--work", str(work / "site")])
    assert shown.exit_code == 1 and "DAMAGED" in shown.output and "Restore the ledger" in " ".join(shown.output.split())


def test_a_site_with_a_budget_refuses_a_run_without_dp(work: Path) -> None:
    """The coordinator sets `dp`; the budget is the site's: a run with dp = false trains and scores nothing."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 505, 505, 7
    plain = dataclasses.replace(CFG, dp=False)
    arrays = arrays_to_record(initial_global_arrays(plain))
    for message_type in (MessageType.TRAIN, MessageType.EVALUATE):
        context = Context(run_id=505, node_id=7, node_config=_node_config(work, 8.0), state=RecordDict(),
                          run_config={})
        config = ConfigRecord({**plain.to_flat(), "server-round": 1})
        reply = client_app(Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=7,
                                   message_type=message_type), context)
        assert reply.has_error(), message_type
        assert "ConfigError" in reply.error.reason and str(work) not in reply.error.reason
    assert not (work / "site" / "privacy").exists() or not summarise_ledgers(work / "site" / "privacy")
    # Without a budget the same run trains as before.
    context = Context(run_id=505, node_id=7, node_config={k: v for k, v in _node_config(work, 8.0).items()
                                                          if not k.startswith("privacy-")},
                      state=RecordDict(), run_config={})
    config = ConfigRecord({**plain.to_flat(), "server-round": 1})
    reply = client_app(Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=7,
                               message_type=MessageType.TRAIN), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert record_to_numpy(reply.content.array_records["arrays"])
