"""ServerApp: FedAvg over a 4-element array; writes each round's aggregate to `out-dir`/rounds.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


class LoggingFedAvg(FedAvg):
    """FedAvg that appends every aggregated round to a JSON-lines file."""

    def __init__(self, out: Path | None, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.out = out

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if self.out is not None and arrays is not None:
            ok = [r for r in replies if r.has_content()]
            row = {
                "round": server_round,
                "replies": len(ok),
                "values": sorted(float(r.content["metrics"]["site-value"]) for r in ok),
                "mean": arrays.to_numpy_ndarrays()[0].tolist(),
            }
            with (self.out / "rounds.jsonl").open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        return arrays, metrics


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    out = Path(str(cfg["out-dir"])) if cfg.get("out-dir") else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    sites = int(cfg["min-sites"])
    strategy = LoggingFedAvg(
        out, fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=sites, min_available_nodes=sites
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord([np.zeros(4, dtype=np.float32)]),
        num_rounds=int(cfg["num-rounds"]),
        timeout=float(cfg["round-timeout"]),
    )
    if out is not None:
        final = result.arrays.to_numpy_ndarrays()[0].tolist()
        (out / "final.json").write_text(json.dumps({"final": final}))
