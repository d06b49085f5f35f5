"""What a hospital's GPU runs, on CUDA (skipped without a GPU; run with `pytest -m gpu` on a GPU host).

A site's pretraining round (iBOT, bf16 autocast), its DP-SGD round, its probe evaluation and its
federated fine-tuning round, through the same functions the ClientApp calls; the task trainers
(segmentation, detection) the downstream CLI runs; and the agreement of a CUDA forward pass with the
CPU's. Everything sent must come back on the CPU, in float32: the server and the wire never see a
CUDA tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

import simulations
from client.finetuning import finetune_round
from client.privacy.accountant import PrivacyBudget
from client.privacy.charging import LedgerScope
from client.privacy.ledger import LedgerBook
from client.training import evaluate_round, train_round
from strategies.protocol.scenario import load_scenario, site_data
from strategies.protocol.task_models import initial_head, task_samples
from visionfm_core.modalities import get_modality
from visionfm_core.models.encoders import EncoderSpec, create_encoder
from visionfm_core.pretraining import initial_global_arrays
from visionfm_core.run_config import RunConfig
from visionfm_core.splits import ModalitySplit
from visionfm_core.ssl.config import SSLConfig
from visionfm_core.ssl.schedules import schedule_at
from visionfm_core.ssl.trainer import SSLTrainer
from visionfm_core.tasks.adapters import DetectionTask, SegmentationTask
from visionfm_core.tasks.data import Preprocess
from visionfm_core.tasks.public_sets import hrf_samples, idrid_optic_disc
from visionfm_core.tasks.splits import TaskSplit
from visionfm_core.tasks.trainer import FineTuneConfig, FineTuner

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DATA = Path(simulations.__file__).parent / "data"
SSL = {"out_dim": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16, "local_crops": 2, "local_crop_size": 16}


def run_config(**changes: object) -> RunConfig:
    base: dict[str, object] = dict(num_rounds=2, local_steps=3, batch_size=8, arch="nano", image_size=32,
                                   patch_size=8, modalities="fundus", scenario="quick", device="cuda", ssl=SSL)
    base.update(changes)
    return RunConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def site() -> dict[str, ModalitySplit]:
    data = site_data(load_scenario("quick"), 0, 0.2)
    fundus = data["fundus"]
    return {"fundus": ModalitySplit("fundus", fundus.train[:64], fundus.val[:32], fundus.num_classes)}


@pytest.fixture(autouse=True)
def _fresh_cuda() -> Iterator[None]:
    yield
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _all_sendable(arrays: Mapping[str, torch.Tensor]) -> None:
    assert arrays
    for key, value in arrays.items():
        assert value.device.type == "cpu", f"{key} left on {value.device}"
        if value.is_floating_point():
            assert value.dtype == torch.float32, f"{key} is {value.dtype}"
            assert bool(torch.isfinite(value).all()), key


def _moved(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> int:
    return sum(not torch.equal(before[k], after[k]) for k in after if k in before)


@pytest.mark.parametrize("objective", ["ibot", "dino"])
def test_a_sites_pretraining_round_runs_on_the_gpu_and_sends_cpu_float32(
    site: dict[str, ModalitySplit], objective: str
) -> None:
    cfg = run_config(objective=objective)
    start = initial_global_arrays(cfg)
    first = train_round(site, start, cfg, 1, {})
    _all_sendable(first.arrays)
    assert math.isfinite(first.metrics["fundus/loss"]) and first.metrics["fundus/images_per_s"] > 0
    assert _moved(start, first.arrays) > 0.5 * len(first.arrays)
    # The site's local state (teacher, centres, AdamW moments) is carried to the next round on the CPU too.
    local = first.local_state["fundus"]
    assert all(v.device.type == "cpu" for v in local.values())
    second = train_round(site, first.arrays, cfg, 2, first.local_state)
    _all_sendable(second.arrays)
    assert _moved(first.arrays, second.arrays) > 0


def test_the_gpu_step_uses_bf16_autocast_where_the_device_has_it() -> None:
    trainer = SSLTrainer(EncoderSpec("nano", 32, 8), get_modality("fundus"), SSLConfig.from_dict(SSL), 10,
                         device="cuda")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert trainer.amp_dtype == expected
    assert next(trainer.student.parameters()).device.type == "cuda"


def test_a_cuda_forward_pass_agrees_with_the_cpu() -> None:
    """Same weights, same multi-crop views, fp32 (no autocast): the iBOT loss matches the CPU's."""
    cfg = SSLConfig.from_dict({**SSL, "amp": False})
    spec, fundus = EncoderSpec("nano", 32, 8), get_modality("fundus")
    cpu = SSLTrainer(spec, fundus, cfg, 10, device="cpu", seed=3)
    gpu = SSLTrainer(spec, fundus, cfg, 10, device="cuda", seed=3)
    gpu.load_shared_state(cpu.shared_state(), teacher_sync="reset")
    generator = torch.Generator().manual_seed(0)
    views = [torch.randn(4, 3, 32, 32, generator=generator)] * 2 + [torch.randn(4, 3, 16, 16, generator=generator)] * 2
    masks = cpu._draw_masks(views[0], np.random.default_rng(0))
    schedule = schedule_at(cfg, 2, 10)
    with torch.no_grad():
        on_cpu = cpu._forward(cpu._check_views(views), masks, schedule)
        on_gpu = gpu._forward(gpu._check_views(views), masks.to("cuda"), schedule)
    # TF32 convolutions (PyTorch's CUDA default) allow about 1e-3 relative error.
    assert float(on_gpu.loss.cpu()) == pytest.approx(float(on_cpu.loss), rel=1e-2)


def test_a_sites_dp_sgd_round_runs_on_the_gpu(site: dict[str, ModalitySplit], tmp_path: Path) -> None:
    cfg = run_config(dp=True, local_steps=2,
                     privacy={"noise_multiplier": 1.0, "max_grad_norm": 1.0, "expected_batch_size": 8})
    start = initial_global_arrays(cfg)
    result = train_round(site, start, cfg, 1, {}, budget=PrivacyBudget(8.0, 1e-5),
                         ledger=LedgerScope(LedgerBook(tmp_path)))
    _all_sendable(result.arrays)
    assert 0 < result.metrics["fundus/epsilon"] <= 8.0
    assert "fundus/loss" not in result.metrics  # un-noised statistics never leave a DP site, GPU or not
    assert _moved(start, result.arrays) > 0


def test_probe_scores_on_the_gpu_match_the_cpus(site: dict[str, ModalitySplit]) -> None:
    arrays = initial_global_arrays(run_config())
    on_gpu = evaluate_round(site, arrays, run_config())
    on_cpu = evaluate_round(site, arrays, run_config(device="cpu"))
    assert set(on_gpu) == set(on_cpu) and "fundus/knn_accuracy" in on_gpu
    # Features come from bf16 autocast on the GPU: near ties in k-NN may flip, a few points at most.
    for key, value in on_cpu.items():
        assert on_gpu[key] == pytest.approx(value, abs=0.1), key


@pytest.mark.parametrize("encoder", ["trained", "frozen"])
def test_a_sites_fine_tuning_round_runs_on_the_gpu(site: dict[str, ModalitySplit], encoder: str) -> None:
    cfg = run_config(finetune_rounds=1, finetune_epochs=1, finetune_min_steps=0, finetune_encoder=encoder,
                     phase="finetune", finetune_classes="fundus=5")
    arrays = {**initial_global_arrays(cfg),
              **{f"fundus/classifier.{k}": v for k, v in initial_head(cfg, "fundus").items()}}
    tasks = {m: TaskSplit(m, task_samples(s.train), task_samples(s.val)) for m, s in site.items()}
    result = finetune_round(tasks, arrays, cfg, 1, {})
    _all_sendable(result.arrays)
    assert any(k.startswith("fundus/classifier.") for k in result.arrays)
    assert any(k.startswith("fundus/backbone.") for k in result.arrays) == (encoder == "trained")
    assert 0.0 <= result.metrics["fundus/val-accuracy"] <= 1.0


def test_vessel_segmentation_trains_on_the_gpu_and_predicts_at_source_resolution() -> None:
    samples = hrf_samples(DATA / "hrf", with_vessels=True)
    tuner = FineTuner(SegmentationTask(2, ("background", "vessel"), features=4),
                      FineTuneConfig(epochs=2, batch_size=2), device="cuda")
    preprocess = Preprocess.for_modality("fundus", 64)
    encoder = create_encoder(EncoderSpec("nano", 64, 16))
    result = tuner.fit(encoder, samples[:2], samples[2:3], preprocess)
    assert next(result.model.parameters()).device.type == "cuda"
    assert 0.0 <= result.best_validation["dice"] <= 1.0
    prediction = tuner.predict(result.model, tuner.loader(samples[:1], preprocess, False, with_targets=False))[0]
    assert prediction["mask"].shape == (1168, 1752)


def test_tiled_vessel_segmentation_runs_on_the_gpu_at_source_resolution() -> None:
    samples = hrf_samples(DATA / "hrf", with_vessels=True)
    task = SegmentationTask(2, ("background", "vessel"), features=4)
    tuner = FineTuner(task, FineTuneConfig(epochs=1, min_steps=2, batch_size=2), device="cuda")
    options = {**task.preprocess_defaults(), "fov_diameter": 256, "crops_per_image": 2}
    preprocess = Preprocess.for_modality("fundus", 64, fov_crop=True, **options)
    result = tuner.fit(create_encoder(EncoderSpec("nano", 64, 16)), samples[:2], samples[2:3], preprocess)
    assert 0.0 <= result.best_validation["dice"] <= 1.0 and "best_threshold" in result.best_validation
    prediction = tuner.predict(result.model, tuner.loader(samples[:1], preprocess, False, with_targets=False))[0]
    assert prediction["mask"].shape == (1168, 1752)


def test_optic_disc_detection_trains_on_the_gpu() -> None:
    samples = idrid_optic_disc(DATA / "idrid_seg")
    tuner = FineTuner(DetectionTask(1, ("disc",)), FineTuneConfig(epochs=2, batch_size=4), device="cuda")
    preprocess = Preprocess.for_modality("fundus", 64)
    result = tuner.fit(create_encoder(EncoderSpec("nano", 64, 16)), samples[:8], samples[8:10], preprocess)
    assert 0.0 <= result.best_validation["map50"] <= 1.0
    for box in tuner.predict(result.model, tuner.loader(samples[:1], preprocess, False))[0]["boxes"]:
        x0, y0, x1, y1 = box["box"]
        assert 0 <= x0 <= x1 <= 1072 and 0 <= y0 <= y1 <= 712
