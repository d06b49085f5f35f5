"""Fine-tuning on two gloo workers against one process with the doubled batch (`DistributedFineTuner`).

Tolerance: both layouts compute the same sums in a different order (two shard means averaged by DDP's
all-reduce instead of one mean over the whole batch; BatchNorm statistics summed over two shards), so in
fp32 (autocast off, augmentation off) they differ by rounding only, ~1e-7 relative per operation. AdamW
divides by the root of the second moment, so a rounding difference in a gradient moves the update by about
the same relative amount; measured over the 15 steps here: losses within 3e-8 relative, weights within
2e-6 absolute. `rtol=1e-4` on the losses and `atol=1e-5` (+ `rtol=1e-4`) on weights leave room for other
CPUs' summation orders and still catch real mistakes by orders of magnitude (measured by breaking the
code): BatchNorm normalising each shard with its own statistics moves the losses by 11% and weights by
7e-2; workers that do not average their gradients (no DDP) move the losses by 2% and weights by 7e-3.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from tests.unit.tasks.helpers import tiny_encoder
from visionfm_core.data.items import ImageItem, items_from_arrays
from visionfm_core.distributed import DistContext, launch
from visionfm_core.errors import DataError
from visionfm_core.tasks.adapters import ClassificationTask
from visionfm_core.tasks.adapters.segmentation import SegmentationTask
from visionfm_core.tasks.data import Preprocess
from visionfm_core.tasks.data_parallel import DistributedFineTuner, ShardSampler
from visionfm_core.tasks.samples import TaskSample
from visionfm_core.tasks.trainer import FineTuneConfig, FineTuner, get_weights

PER_WORKER = 4
PRE = Preprocess(image_size=32, max_zoom=1.0, flip=False, jitter=0.0)  # augmentation off


def _samples(count: int, seed: int) -> list[TaskSample]:
    """Bright images are class 1, dark ones class 0 (a problem the tiny model learns in a few steps)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    images = (rng.integers(0, 90, (count, 32, 32, 3)) + 120 * labels[:, None, None, None]).astype(np.uint8)
    return [TaskSample(item, label=item.label) for item in items_from_arrays(images, labels, f"dp{seed}")]


def _fit(ctx: DistContext | None, regime: str, ema_decay: float = 0.0) -> dict[str, Any]:
    torch.set_num_threads(1)
    batch = PER_WORKER if ctx is not None else 2 * PER_WORKER
    config = FineTuneConfig(regime=regime, epochs=3, batch_size=batch, min_steps=0, max_validations=3,  # type: ignore[arg-type]
                            mixed_precision=False, lr=1e-3, seed=3, ema_decay=ema_decay)
    task = ClassificationTask(2)
    tuner = FineTuner(task, config) if ctx is None else DistributedFineTuner(task, config, "cpu", ctx)
    torch.manual_seed(0)  # the same encoder in both layouts
    result = tuner.fit(tiny_encoder(32, "nano", 8), _samples(40, 0), _samples(12, 1), PRE)
    weights = get_weights(result.model, "all")
    if ctx is not None:  # every worker's weights, to check they agree
        every: list[Any] = [None] * ctx.world_size
        torch.distributed.all_gather_object(every, weights)
    return {"losses": [r.train["loss"] for r in result.history], "auc": [r.validation["auc"] for r in result.history],
            "best_epoch": result.best_epoch, "steps": result.steps, "batch": result.batch_size, "weights": weights,
            "threshold": task.threshold, "workers": every if ctx is not None else [weights]}


def _both_regimes(ctx: DistContext | None) -> dict[str, Any]:
    return {regime: _fit(ctx, regime) for regime in ("full", "frozen")}


def test_two_workers_follow_one_process_with_the_doubled_batch() -> None:
    single = _both_regimes(None)
    double = launch(_both_regimes, (), world_size=2, device="cpu")
    for regime in ("full", "frozen"):  # full: ViT + linear head; frozen: VisionFM's probe with BatchNorm
        one, two = single[regime], double[regime]
        assert two["steps"] == one["steps"] == 15 and two["batch"] == PER_WORKER and one["batch"] == 2 * PER_WORKER
        np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-4, err_msg=regime)
        np.testing.assert_allclose(two["auc"], one["auc"], atol=1e-6, err_msg=regime)
        assert two["best_epoch"] == one["best_epoch"] and two["threshold"] == one["threshold"]
        assert one["losses"][-1] < one["losses"][0]  # it trained
        for key, value in one["weights"].items():  # BatchNorm's running statistics included
            torch.testing.assert_close(two["weights"][key], value, rtol=1e-4, atol=1e-5, msg=f"{regime} {key}")
        rank0, rank1 = two["workers"]
        for key, value in rank0.items():
            assert torch.equal(rank1[key], value), f"{regime}: {key} differs between the workers"
    assert any(k.endswith("running_var") for k in double["frozen"]["weights"])


def _averaged(ctx: DistContext | None) -> dict[str, Any]:
    # The frozen regime's probe has BatchNorm: its running statistics are averaged too.
    return {"frozen": _fit(ctx, "frozen", ema_decay=0.8)}


def test_two_workers_average_the_weights_as_one_process() -> None:
    """The moving average follows the model inside DDP: the same averaged weights (BatchNorm statistics
    included) are validated and returned on every worker as in one process."""
    single = _averaged(None)
    double = launch(_averaged, (), world_size=2, device="cpu")
    for regime in ("frozen",):
        one, two = single[regime], double[regime]
        np.testing.assert_allclose(two["auc"], one["auc"], atol=1e-6, err_msg=regime)
        assert two["best_epoch"] == one["best_epoch"]
        for key, value in one["weights"].items():
            torch.testing.assert_close(two["weights"][key], value, rtol=1e-4, atol=1e-5, msg=f"{regime} {key}")
        rank0, rank1 = two["workers"]
        for key, value in rank0.items():
            assert torch.equal(rank1[key], value), f"{regime}: {key} differs between the workers"


def test_shards_of_the_seeded_order_make_the_single_process_batches() -> None:
    dataset = list(range(23))
    batches = {}
    for world in (1, 2):
        generator = torch.Generator().manual_seed(7)
        shards = []
        for rank in range(world):
            generator.manual_seed(7)
            order = torch.utils.data.RandomSampler(dataset, generator=generator)
            shards.append([list(ShardSampler(order, rank, world, len(dataset))) for _ in range(2)])  # 2 epochs
        batches[world] = shards
    whole = batches[1][0]
    for epoch in range(2):
        first, second = batches[2][0][epoch], batches[2][1][epoch]
        assert len(first) == len(second) == 11 and not set(first) & set(second)
        for step in range(2):  # batches of 4 per worker = the single process's batches of 8
            assert sorted(first[4 * step:4 * step + 4] + second[4 * step:4 * step + 4]) == \
                sorted(whole[epoch][8 * step:8 * step + 8])
    assert batches[2][0][0] != batches[2][0][1]  # a new order every epoch


def _vessels(count: int) -> list[TaskSample]:
    rng = np.random.default_rng(0)
    samples = []
    for number in range(count):
        image = rng.integers(0, 255, (80, 96, 3)).astype(np.uint8)
        mask = (image[..., 0] > 128).astype(np.uint8) * 255
        samples.append(TaskSample(ImageItem(f"eye{number}", _array=image), mask=mask))
    return samples


def _first_tiles(ctx: DistContext) -> list[Any]:
    """The windows of this worker's first tiled-segmentation batch, twice from scratch, from every worker."""
    torch.set_num_threads(1)
    draws = []
    for _ in range(2):
        tuner = DistributedFineTuner(SegmentationTask(2), FineTuneConfig(batch_size=2, seed=5), "cpu", ctx)
        preprocess = Preprocess(image_size=32, tiles=True, fov_diameter=0, crops_per_image=4, max_zoom=1.3)
        loader = tuner.loader(_vessels(4), preprocess, train=True)
        tuner.init_state(tuner.build_model(tiny_encoder(32, "nano", 8)), total_steps=4)
        draws.append(next(iter(loader))["window"])
    every: list[Any] = [None] * ctx.world_size
    torch.distributed.all_gather_object(every, draws)
    return every


def test_tiled_crops_repeat_on_each_worker_and_differ_between_workers() -> None:
    (first0, again0), (first1, again1) = launch(_first_tiles, (), world_size=2, device="cpu")
    assert torch.equal(first0, again0) and torch.equal(first1, again1)  # seed + rank: the same every run
    assert not torch.equal(first0, first1)  # the two workers draw their own crops


def _too_few(ctx: DistContext) -> None:
    DistributedFineTuner(ClassificationTask(2), FineTuneConfig(), "cpu", ctx).loader(_samples(1, 0), PRE, train=True)


def test_fewer_images_than_workers_is_refused() -> None:
    with pytest.raises(DataError, match="1 training input"):
        _too_few(DistContext(rank=0, world_size=2, backend="gloo"))
