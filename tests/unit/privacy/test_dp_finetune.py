"""DP fine-tuning of a classifier on real fundus images through the one fine-tuning trainer's model:
exact per-sample gradients, a learning private run with accounting, frozen BatchNorm statistics."""

from __future__ import annotations

import math

import pytest
import torch

from client.privacy.accountant import PrivacyBudget, PrivacyBudgetExceeded, SiteAccountant
from client.privacy.dp_finetune import DPFineTuner, per_sample_tensors, task_sample_loss
from client.privacy.dp_step import per_sample_gradients
from strategies.protocol.dp_config import DPConfig
from visionfm_core.data.items import ImageItem
from visionfm_core.errors import ConfigError
from visionfm_core.models.encoders import EncoderSpec, create_encoder
from visionfm_core.models.heads import TaskModel
from visionfm_core.tasks.adapters.classification import ClassificationTask
from visionfm_core.tasks.data import Preprocess, collate
from visionfm_core.tasks.samples import TaskSample
from visionfm_core.tasks.trainer import FineTuneConfig, FineTuner

PREPROCESS = Preprocess.for_modality("fundus", 32)


def _tuner(regime: str = "full", **task: object) -> FineTuner:
    config = FineTuneConfig(regime=regime, batch_size=8, mixed_precision=False, warmup_epochs=0.0)  # type: ignore[arg-type]
    return FineTuner(ClassificationTask(num_classes=5, mode="ordinal", **task), config)  # type: ignore[arg-type]


def _model(tuner: FineTuner) -> TaskModel:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return tuner.build_model(create_encoder(EncoderSpec("nano", image_size=32, patch_size=8)))


def _samples(items: list[ImageItem]) -> list[TaskSample]:
    return [TaskSample(item, label=item.label) for item in items]


def test_per_sample_gradients_through_the_task_model_equal_a_loop(fundus_items: list[ImageItem]) -> None:
    tuner = _tuner()
    model = _model(tuner).train()
    dataset_records = [
        tuner.loader(_samples(fundus_items[:4]), PREPROCESS, train=False).dataset[i] for i in range(4)
    ]
    batch = per_sample_tensors(collate(dataset_records), torch.device("cpu"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = per_sample_gradients(model, task_sample_loss(tuner), batch, names).grads
    for i in range(4):
        model.zero_grad(set_to_none=True)
        single = {k: v[i : i + 1] for k, v in batch.items()}
        tuner.task.loss(model(single["image"]), single).backward()
        for name, param in model.named_parameters():
            assert param.grad is not None
            scale = float(param.grad.abs().max()) + 1e-12
            assert float((grads[name][i] - param.grad).abs().max()) <= 1e-4 * scale, f"sample {i} {name}"


def test_a_private_fine_tuning_run_learns_and_reports_epsilon(fundus_items: list[ImageItem]) -> None:
    tuner = _tuner()
    model = _model(tuner)
    state = tuner.init_state(model, total_steps=20)
    accountant = SiteAccountant(PrivacyBudget(10.0, 1e-3))
    private = DPFineTuner(
        tuner,
        DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8),
        accountant,
        noise_seed=0,
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = private.train_steps(state, private.loader(_samples(fundus_items), PREPROCESS, seed=0), 3)
    assert math.isfinite(metrics["loss"]) and metrics["steps"] == 3 and state.step == 3
    assert (
        0 < metrics["epsilon"] < 10
        and metrics["sample_rate"] == 8 / 64
        and metrics["noise_multiplier"] == 1.0
    )
    assert accountant.history == [(1.0, 0.125, 3)]
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert any(k.startswith("encoder.") for k in changed) and any(k.startswith("head.") for k in changed)


def test_frozen_regime_trains_the_probe_with_frozen_batchnorm_statistics(
    fundus_items: list[ImageItem],
) -> None:
    tuner = _tuner(regime="frozen")
    model = _model(tuner)
    state = tuner.init_state(model, total_steps=10)
    private = DPFineTuner(
        tuner,
        DPConfig(noise_multiplier=1.0, expected_batch_size=8),
        SiteAccountant(PrivacyBudget(10.0, 1e-3)),
        noise_seed=0,
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    private.train_steps(state, private.loader(_samples(fundus_items), PREPROCESS, seed=0), 2)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    statistics = [k for k in before if "running_" in k or "num_batches_tracked" in k]
    assert statistics and all(torch.equal(before[k], after[k]) for k in statistics)
    assert not torch.equal(before["head.mlp.1.weight"], after["head.mlp.1.weight"])


def test_class_weights_and_overdrawn_budgets_are_refused(fundus_items: list[ImageItem]) -> None:
    weighted = _tuner(class_weighting="balanced")
    weighted.task.fit_to_data(_samples(fundus_items))
    with pytest.raises(ConfigError, match="class_weighting"):
        DPFineTuner(weighted, DPConfig(), SiteAccountant(PrivacyBudget(1.0, 1e-5)))
    tuner = _tuner()
    model = _model(tuner)
    state = tuner.init_state(model, total_steps=10)
    private = DPFineTuner(
        tuner,
        DPConfig(noise_multiplier=0.5, expected_batch_size=32),
        SiteAccountant(PrivacyBudget(1.0, 1e-3)),
    )
    loader = private.loader(_samples(fundus_items), PREPROCESS)
    with pytest.raises(PrivacyBudgetExceeded):
        private.train_steps(state, loader, 5)
    assert state.step == 0 and private.accountant.history == []
