"""A round deadline on Flower's simulation engine (Ray): the round aggregates the replies that arrived,
the straggler is counted, and its late reply, arriving during the next round, is dropped unread.

The sites are a tiny ClientApp (it echoes the global arrays): what is under test is the coordinator's
round loop. Files in the test's folder order events across the Ray workers, so nothing depends on
how fast this machine is: the straggler answers round 1 only once round 1 is over, and round 2's other
sites answer only after the straggler's late reply is on its way."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from client.app import REPLY_INFO, reply_info
from server.federation.rounds import Federation
from strategies.protocol.records import arrays_to_record
from visionfm_core.run_config import RunConfig

STRAGGLER = 2
KEY = "fundus/backbone.weight"


def _wait_for(path: Path, limit: float = 120.0) -> None:
    end = time.monotonic() + limit
    while not path.exists() and time.monotonic() < end:
        time.sleep(0.05)


def _echo(msg: Message, context: Context, value: float) -> Message:
    arrays = arrays_to_record({KEY: np.full(4, value, dtype=np.float32)})
    metrics = MetricRecord({"fundus/num-examples": 1, "fundus/loss": 1.0,
                            "site-index": float(context.node_config["partition-id"])})
    # The reply names the round and global model it answers, as every site's does (stale replies are refused).
    return Message(RecordDict({"arrays": arrays, "metrics": metrics, REPLY_INFO: reply_info(msg)}), reply_to=msg)


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    folder = Path(os.environ["VFM_DEADLINE_TEST_DIR"])
    server_round = int(str(msg.content.config_records["config"]["server-round"]))
    site = int(context.node_config["partition-id"])
    if site == STRAGGLER and server_round == 1:
        _wait_for(folder / "round-1-over")  # misses the deadline, answers during round 2
        reply = _echo(msg, context, 100.0)
        (folder / "late-reply-sent").touch()
        return reply
    if server_round == 2:
        _wait_for(folder / "late-reply-sent")
        time.sleep(1.0)  # the late reply is stored before round 2's last reply
    # A new value each round: the coordinator refuses a site's update that repeats one it already accepted.
    return _echo(msg, context, float(site + 1 + 10 * max(0, server_round - 1)))


def _server_app(cfg: RunConfig, folder: Path, results: dict[str, object]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        # Start the workers without a deadline, so that a slow start on a busy machine is not a straggler.
        warm = Federation(grid, cfg.replace(round_deadline=0.0), {KEY: np.zeros(4, np.float32)})
        warm.train_round(0)
        federation = Federation(grid, cfg, {KEY: np.zeros(4, np.float32)})
        results["round-1"] = federation.train_round(1)
        results["after-1"] = federation.arrays[KEY].copy()
        (folder / "round-1-over").touch()
        results["round-2"] = federation.train_round(2)
        results["rows"] = federation.metrics.rows

    return app


def test_a_round_goes_on_without_its_straggler_and_drops_its_late_reply(tmp_path: Path) -> None:
    os.environ["VFM_DEADLINE_TEST_DIR"] = str(tmp_path)
    ray_dir = tempfile.mkdtemp(prefix="vfm-ray-")  # Ray's socket paths must stay short
    cfg = RunConfig(out_dir=str(tmp_path / "run"), min_sites=2, round_deadline=8.0, round_timeout=600.0)
    results: dict[str, object] = {}
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": 3, "include_dashboard": False, "_temp_dir": ray_dir}}
    try:
        run_simulation(server_app=_server_app(cfg, tmp_path, results), client_app=client_app, num_supernodes=3,
                       backend_config=backend)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert results["round-1"] is True and results["round-2"] is True
    # Round 1 is the mean of sites 1 and 2 only (values 1 and 2): the straggler's 100 is nowhere.
    np.testing.assert_allclose(results["after-1"], np.full(4, 1.5, np.float32))
    rows = {r["round"]: r for r in results["rows"] if r["phase"] == "sampling-train"}  # type: ignore[attr-defined]
    assert (rows[1]["sampled"], rows[1]["replied"], rows[1]["stragglers"], rows[1]["late_dropped"]) == (3, 2, 1, 0)
    assert (rows[2]["replied"], rows[2]["stragglers"], rows[2]["late_dropped"]) == (3, 0, 1)
