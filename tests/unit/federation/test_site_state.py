"""Between-round site state: Flower's context in simulation, private files on the site's disk in deployment."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import simulations
from client.app import LOCAL_STATE_PREFIX
from client.app import app as client_app
from client.site_state import KEEP_HOURS_KEY, STATE_DIR_KEY, SiteStateStore
from strategies.protocol.records import arrays_to_record
from visionfm_core.pretraining import initial_global_arrays
from visionfm_core.run_config import RunConfig

OCT = Path(simulations.__file__).parent / "data" / "oct2017_val"


def _context(node_config: dict, run_id: int = 1) -> Context:
    return Context(run_id=run_id, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_on_disk_state_round_trips_per_run_with_private_files(tmp_path: Path) -> None:
    tensors = {"teacher.w": torch.arange(6.0).view(2, 3), "step": torch.tensor(4)}
    context = _context({STATE_DIR_KEY: str(tmp_path)})
    store = SiteStateStore(context)
    store.save("local-ssl-state/fundus", tensors)
    assert not context.state.array_records  # nothing in Flower's context
    (saved,) = list((tmp_path / "run-1").iterdir())
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600 and "/" not in saved.name
    again = SiteStateStore(_context({STATE_DIR_KEY: str(tmp_path)}))
    assert again.names("local-ssl-state/") == ["local-ssl-state/fundus"]
    loaded = again.load("local-ssl-state/fundus")
    assert loaded is not None and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert SiteStateStore(_context({STATE_DIR_KEY: str(tmp_path)}, run_id=2)).names("local-ssl-state/") == []


def test_a_new_run_deletes_only_other_runs_state_idle_past_the_limit(tmp_path: Path) -> None:
    config = {STATE_DIR_KEY: str(tmp_path), KEEP_HOURS_KEY: 24}
    for run_id in (1, 2):
        SiteStateStore(_context(config, run_id)).save("local-ssl-state/fundus", {"w": torch.ones(3)})
    two_days_ago = time.time() - 48 * 3600
    for path in [tmp_path / "run-1", *(tmp_path / "run-1").iterdir()]:
        os.utime(path, (two_days_ago, two_days_ago))
    store = SiteStateStore(_context(config, 3))
    store.save("local-ssl-state/fundus", {"w": torch.zeros(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-2", "run-3"]  # run 2 was written just now
    store.save("local-ssl-state/oct", {"w": torch.zeros(3)})  # later saves of the run do not rescan
    assert SiteStateStore(_context(config, 2)).load("local-ssl-state/fundus") is not None


def test_without_a_state_dir_the_state_lives_in_flowers_context() -> None:
    context = _context({})
    SiteStateStore(context).save("personal-head/oct", {"fc.weight": torch.ones(2, 2)})
    assert list(context.state.array_records) == ["personal-head/oct"]
    assert SiteStateStore(context).names("personal-head/") == ["personal-head/oct"]


def test_a_deployed_site_keeps_its_ssl_state_on_disk_between_rounds(tmp_path: Path) -> None:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 7
    cfg = RunConfig(num_rounds=2, local_steps=1, batch_size=4, arch="nano", image_size=32, patch_size=8,
                    modalities="oct", ssl={"out_dim": 32, "head_hidden_dim": 32, "head_bottleneck_dim": 16,
                                           "local_crops": 0})
    node_config = {"data-path": str(OCT), "modalities": "oct", STATE_DIR_KEY: str(tmp_path / "state")}
    arrays = arrays_to_record(initial_global_arrays(cfg))
    steps = []
    for server_round in (1, 2):
        context = _context(node_config)  # a SuperNode starts each message with a fresh context
        message = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({**cfg.to_flat(),
                                                                                 "server-round": server_round})}),
                          dst_node_id=7, message_type=MessageType.TRAIN)
        reply = client_app(message, context)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        assert not context.state.array_records
        state = SiteStateStore(context).load(LOCAL_STATE_PREFIX + "oct")
        assert state is not None and any(k.startswith("teacher.") for k in state)
        steps.append(int(state["optim.backbone.cls_token.step"]))
    assert steps == [1, 2]  # AdamW's own step count: round 2 continued from round 1's saved moments
