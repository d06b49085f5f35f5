"""A multi-device site on CPU: two worker processes with gloo against one process with the doubled batch.

Tolerance: the two layouts compute the same sums in a different order (per-shard means averaged by an
all-reduce, instead of one mean over the whole batch), so in fp32 (autocast off) they differ by rounding
only, ~1e-7 relative per operation. Adam's step is scale-free, so such differences could in principle grow
over steps; measured over these steps they stay below 1e-5. `rtol=2e-4` allows 20x that and is still far
below what a real mistake does (a centre that is not all-reduced, unaveraged gradients or repeated iBOT
masks change the losses by 1e-3 to 1e-1 from the second step)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import numpy as np
import pytest
import torch

from visionfm_core.distributed import DistContext, WorkerFailedError, launch
from visionfm_core.modalities import get_modality
from visionfm_core.models.encoders import EncoderSpec
from visionfm_core.ssl.config import SSLConfig
from visionfm_core.ssl.trainer import SSLTrainer

BATCH = 4  # per worker; the single process trains on 2 x BATCH
STEPS = 4
SPEC = EncoderSpec(arch="nano", image_size=32, patch_size=8)


def _config(objective: str) -> SSLConfig:
    return SSLConfig(objective=objective, batch_size=BATCH, local_crops=2, out_dim=64, head_hidden_dim=32,
                     head_bottleneck_dim=16, amp=False)


def _views(step: int, batch: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    views = [torch.randn(batch, 3, 32, 32, generator=generator) for _ in range(2)]
    return views + [torch.randn(batch, 3, 16, 16, generator=generator) for _ in range(2)]


def _train(ctx: DistContext | None, objective: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    world, rank = (ctx.world_size, ctx.rank) if ctx is not None else (1, 0)
    trainer = SSLTrainer(SPEC, get_modality("fundus"), _config(objective), total_steps=STEPS, seed=5, dist=ctx)
    losses = []
    for step in range(STEPS):
        # The same images every time: the whole batch of 2 x BATCH, of which each worker takes its slice.
        views = [v[rank * (2 * BATCH // world):(rank + 1) * (2 * BATCH // world)] for v in _views(step, 2 * BATCH)]
        losses.append(trainer.train_step(views, step)["loss"])
    return {"losses": losses, "center": trainer.center_cls.clone(),
            "teacher": {k: v.clone() for k, v in trainer.teacher.state_dict().items()},
            "student": trainer.shared_state()}


@pytest.mark.parametrize("objective", ["dino", "ibot"])
def test_two_gloo_workers_follow_one_process_with_the_doubled_batch(objective: str) -> None:
    single = _train(None, objective)
    double = launch(_train, (objective,), world_size=2, device="cpu")
    np.testing.assert_allclose(double["losses"], single["losses"], rtol=2e-4)
    torch.testing.assert_close(double["center"], single["center"], rtol=2e-4, atol=1e-5)
    for key, value in single["teacher"].items():
        torch.testing.assert_close(double["teacher"][key], value, rtol=2e-3, atol=2e-5, msg=key)
    for key, value in single["student"].items():
        torch.testing.assert_close(double["student"][key], value, rtol=2e-3, atol=2e-5, msg=key)


def _die_on_rank_one(ctx: DistContext) -> None:
    if ctx.rank == 1:
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    tensor = torch.ones(1)
    ctx.mean_(tensor)  # rank 0 waits here for a worker that is gone
    time.sleep(600)


def _fail_on_rank_one(ctx: DistContext) -> None:
    if ctx.rank == 1:
        raise ValueError("no images left in this shard")
    ctx.mean_(torch.ones(1))
    time.sleep(600)


def test_a_killed_worker_stops_the_others_with_one_clear_error() -> None:
    # Rank 0 sits in an all-reduce with a dead peer, then in a 10-minute sleep: returning at all means it was stopped.
    with pytest.raises(WorkerFailedError, match=r"worker 1 of 2 was killed by SIGKILL; the other workers were "
                                                r"stopped"):
        launch(_die_on_rank_one, (), world_size=2, device="cpu")


def test_a_failing_worker_names_its_error() -> None:
    with pytest.raises(WorkerFailedError, match="worker 1 of 2 failed: ValueError: no images left in this shard"):
        launch(_fail_on_rank_one, (), world_size=2, device="cpu")
