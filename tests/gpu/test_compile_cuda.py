"""torch.compile with CUDA graphs ("reduce-overhead", what `compile = auto` does on CUDA) on a GPU.

Skipped without CUDA (run with `pytest -m gpu` on a GPU host). The speed target (ViT-S/16 at batch 8
at least 2x faster compiled) is a bench, not a test: `python bench/bench_ssl_step.py --device cuda
--configs vit_s16_224 --compile on --no-baseline` prints `ratio compiled / eager`.
"""

from __future__ import annotations

import pytest
import torch

from visionfm_core.compile import CompiledCall, uses_cuda_graphs
from visionfm_core.modalities import get_modality
from visionfm_core.models.encoders import EncoderSpec, create_encoder
from visionfm_core.ssl.config import SSLConfig
from visionfm_core.ssl.trainer import SSLTrainer
from visionfm_core.tasks.adapters import ClassificationTask
from visionfm_core.tasks.trainer import FineTuneConfig, FineTuner

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SPEC = EncoderSpec("nano", image_size=32, patch_size=8, drop_path_rate=0.1)
FUNDUS = get_modality("fundus")


def ssl_cfg(objective: str) -> SSLConfig:
    return SSLConfig(objective=objective, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, local_crops=2,
                     global_crop_size=32, local_crop_size=16, batch_size=4)


def views(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, s, s, generator=generator) for s in (32, 32, 16, 16)]


@pytest.mark.parametrize("objective", ["dino", "ibot"])
def test_auto_compiles_with_cuda_graphs_and_trains_like_eager(objective: str) -> None:
    """`auto` on CUDA: compiled encoders and heads with CUDA graphs, two crop resolutions, iBOT masks,
    drop-path; 4 steps (graphs replayed) give eager's losses within bf16 tolerance, the teacher follows
    by EMA, and the state dicts keep their keys."""
    assert uses_cuda_graphs("auto", "cuda")
    eager = SSLTrainer(SPEC, FUNDUS, ssl_cfg(objective), 4, device="cuda", compile="off")
    compiled = SSLTrainer(SPEC, FUNDUS, ssl_cfg(objective), 4, device="cuda", compile="auto")
    assert isinstance(compiled._student_encode, CompiledCall)
    keys = list(compiled.student.state_dict())
    teacher_before = [p.detach().clone() for p in compiled.teacher.parameters()]
    for step in range(4):
        expected, got = eager.train_step(views(step), step), compiled.train_step(views(step), step)
        # bf16 autocast on both; compiled kernels round differently: a few 1e-3 relative.
        assert got["loss"] == pytest.approx(expected["loss"], rel=2e-2), step
    assert compiled._student_encode.active and compiled._teacher_encode.active, "fell back to eager"
    assert list(compiled.student.state_dict()) == keys
    assert not any("_orig_mod" in k for k in [*compiled.shared_state(), *compiled.local_state()])
    assert any(not torch.equal(a, b) for a, b in zip(teacher_before, compiled.teacher.parameters(), strict=True))
    assert all(t.device.type == "cpu" for t in compiled.shared_state().values())


def test_fine_tuning_step_compiles_with_cuda_graphs() -> None:
    task = ClassificationTask(3)
    tuner = FineTuner(task, FineTuneConfig(batch_size=4, compile="auto"), device="cuda")
    model = tuner.build_model(create_encoder(EncoderSpec("nano", image_size=32, patch_size=8)))
    state = tuner.init_state(model, total_steps=4)
    assert isinstance(state.forward, CompiledCall)
    keys = list(model.state_dict())
    generator = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(4, 3, 32, 32, generator=generator), "label": torch.tensor([0, 1, 2, 1])}
               for _ in range(4)]
    stats = tuner.train_epochs(state, batches, epochs=1)  # type: ignore[arg-type]
    assert stats["steps"] == 4 and torch.isfinite(torch.tensor(stats["loss"]))
    assert state.forward.active, "fell back to eager"
    assert list(model.state_dict()) == keys
