"""torch.compile of the training steps (visionfm_core/compile.py): same losses, same state-dict keys,
eager fallback on a compiler failure, `off` exactly the old step, DP-SGD refused, config validation.

One real (tiny) inductor compile at most: compilation takes tens of seconds on a shared 2-core CPU.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

import pytest
import torch

from tests.unit.tasks.helpers import single_torch_thread  # noqa: F401  (autouse fixture)
from visionfm_core.compile import CompiledCall, check_compile_mode, compile_wanted, maybe_compile
from visionfm_core.errors import ConfigError
from visionfm_core.modalities import get_modality
from visionfm_core.models.encoders import EncoderSpec
from visionfm_core.run_config import RunConfig
from visionfm_core.ssl.config import SSLConfig
from visionfm_core.ssl.trainer import SSLTrainer
from visionfm_core.tasks.trainer import FineTuneConfig

SPEC = EncoderSpec("nano", image_size=16, patch_size=8)
FUNDUS = get_modality("fundus")


def tiny_cfg(**changes: object) -> SSLConfig:
    base = SSLConfig(objective="dino", out_dim=32, head_hidden_dim=16, head_bottleneck_dim=8, local_crops=2,
                     global_crop_size=16, local_crop_size=8, batch_size=2, amp=False)
    return base.replace(**changes)


def views(seed: int) -> list[torch.Tensor]:
    """Two 16 px global views and two 8 px local ones: two resolutions, hence two graphs per encoder."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, s, s, generator=generator) for s in (16, 16, 8, 8)]


def test_modes_parse_and_auto_compiles_on_cuda_only() -> None:
    assert [check_compile_mode(v) for v in ("auto", "ON", "off", "true", False)] == ["auto", "on", "off", "on", "off"]
    with pytest.raises(ConfigError, match=r"compile.*auto, on, off"):
        check_compile_mode("fast")
    assert compile_wanted("auto", "cuda") and not compile_wanted("auto", "cpu")
    assert compile_wanted("on", "cpu") and not compile_wanted("off", "cuda:0")
    with pytest.raises(ConfigError, match="compile"):
        RunConfig(compile="always")
    with pytest.raises(ConfigError, match="compile"):
        FineTuneConfig(compile="sometimes")
    assert RunConfig.from_flat({"compile": "off"}).compile == "off"
    assert RunConfig().compile == FineTuneConfig().compile == "auto"


def test_off_and_cpu_auto_leave_the_step_exactly_as_it_was() -> None:
    """`off` (and `auto` on CPU) hand the trainer the networks' own bound methods: the old step, bit for bit."""
    for mode in ("off", "auto"):
        trainer = SSLTrainer(SPEC, FUNDUS, tiny_cfg(), 4, compile=mode)
        assert trainer._student_encode == trainer.student.encode
        assert trainer._teacher_encode == trainer.teacher.encode
        assert trainer._student_head is trainer.student.head
    first = SSLTrainer(SPEC, FUNDUS, tiny_cfg(), 4, compile="off")
    second = SSLTrainer(SPEC, FUNDUS, tiny_cfg(), 4, compile="auto")
    for step in range(2):
        assert first.train_step(views(step), step) == second.train_step(views(step), step)


def test_a_compiler_failure_falls_back_to_eager_with_one_warning(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """torch.compile replaced by one whose compiled function raises (what a missing C++ compiler or an
    unsupported op does at the first call): the step runs eagerly, identical to `off`, one warning."""

    def broken_compile(fn: Any, **_: Any) -> Any:
        def compiled(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("InductorError: C++ compile error\nlong details")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    eager = SSLTrainer(SPEC, FUNDUS, tiny_cfg(), 4, compile="off")
    with caplog.at_level(logging.WARNING, logger="visionfm_core.compile"):
        trainer = SSLTrainer(SPEC, FUNDUS, tiny_cfg(), 4, compile="on")
        assert isinstance(trainer._student_encode, CompiledCall)
        losses = [trainer.train_step(views(s), s) for s in range(2)]
    assert losses == [eager.train_step(views(s), s) for s in range(2)]
    assert not trainer._student_encode.active and not trainer._teacher_head.active
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # One warning per compiled callable (student/teacher encoder and head), each once, not once per step.
    assert len(warnings) == 4 and len(set(warnings)) == 4
    assert all("running it eagerly" in w and "C++ compile error" in w and "long details" not in w for w in warnings)


def test_a_genuine_error_of_the_step_is_raised_and_compilation_stays_on() -> None:
    calls: list[str] = []

    def eager(x: int) -> int:
        calls.append("eager")
        raise ValueError(f"bad input {x}")

    def compiled(x: int) -> int:
        calls.append("compiled")
        raise ValueError(f"bad input {x}")

    call = CompiledCall(eager, compiled, "a step")
    with pytest.raises(ValueError, match="bad input 3"):
        call(3)
    assert call.active and calls == ["compiled", "eager"]


def test_dp_sgd_trainer_refuses_compilation(caplog: pytest.LogCaptureFixture) -> None:
    from client.privacy.dp_ssl import DPSSLTrainer

    assert DPSSLTrainer.compile_refusal and "DP-SGD" in DPSSLTrainer.compile_refusal
    module = torch.nn.Linear(2, 2)
    with caplog.at_level(logging.INFO, logger="visionfm_core.compile"):
        kept = maybe_compile(module, "on", "cpu", "a DP step", refuse=DPSSLTrainer.compile_refusal)
    assert kept is module
    assert any("torch.compile skipped for a DP step: DP-SGD" in r.getMessage() for r in caplog.records)


def test_a_site_node_config_compile_key_wins_over_the_run_config() -> None:
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, RecordDict

    from client.app import _run_config

    # The handler reads only the message's content (the run config the server sent with it).
    message = SimpleNamespace(content=RecordDict({"config": ConfigRecord({"compile": "on", "server-round": 1})}))
    site = SimpleNamespace(run_config={}, node_config={"compile": "off"})
    assert _run_config(message, site).compile == "off"  # type: ignore[arg-type]
    no_key = SimpleNamespace(run_config={}, node_config={})
    assert _run_config(message, no_key).compile == "on"  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="node config 'compile'"):
        _run_config(message, SimpleNamespace(run_config={}, node_config={"compile": "maybe"}))  # type: ignore[arg-type]


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="inductor on CPU needs a C++ compiler (none on PATH)")
def test_compiled_step_matches_eager_and_keeps_state_dict_keys() -> None:
    """A real inductor compile of the tiny step (two resolutions: separate static graphs), fp32, 3 steps:
    the same losses within fp32 reassociation error, the same trained weights and EMA teacher, and the
    state dicts, shared state and checkpoint keys without `_orig_mod.`."""
    eager = SSLTrainer(SPEC, FUNDUS, tiny_cfg(), 3, compile="off")
    compiled = SSLTrainer(SPEC, FUNDUS, tiny_cfg(), 3, compile="on")
    from torch._dynamo.utils import counters

    keys_before = (list(compiled.student.state_dict()), list(compiled.teacher.state_dict()))
    graphs_after_first_step = 0
    for step in range(3):
        expected, got = eager.train_step(views(step), step), compiled.train_step(views(step), step)
        for key in ("loss", "loss_cls"):
            # fp32; inductor fuses and reorders reductions: differences ~1e-6 relative, 1e-4 is far above.
            assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-5), (step, key)
        if step == 0:
            graphs_after_first_step = counters["stats"]["unique_graphs"]
    # One static graph per callable and crop size, all made in the first step: later steps recompile nothing.
    assert counters["stats"]["unique_graphs"] == graphs_after_first_step > 0
    assert compiled._student_encode.active, "the compiled path must have run, not the fallback"
    assert (list(compiled.student.state_dict()), list(compiled.teacher.state_dict())) == keys_before
    assert not any("_orig_mod" in k for k in [*compiled.shared_state(), *compiled.local_state()])
    for (name, a), b in zip(eager.teacher.state_dict().items(), compiled.teacher.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5, msg=name)  # EMA teacher followed the same student
    # A trainer built from the compiled one's state continues (checkpoint round trip).
    restored = SSLTrainer(SPEC, FUNDUS, tiny_cfg(), 3, compile="off")
    restored.load_local_state(compiled.local_state())
    restored.load_shared_state(compiled.shared_state(), teacher_sync="keep")
    assert restored.step == 3


def test_fine_tuning_off_and_cpu_auto_train_the_model_itself() -> None:
    """The fine-tuning step with `off` (and `auto` on CPU) calls the model as before; `on` wraps a compiled
    forward beside it, the model and its state-dict keys untouched."""
    from visionfm_core.models.encoders import create_encoder
    from visionfm_core.tasks.adapters import ClassificationTask
    from visionfm_core.tasks.trainer import FineTuner

    for mode, compiled in (("off", False), ("auto", False), ("on", True)):
        tuner = FineTuner(ClassificationTask(3), FineTuneConfig(batch_size=4, compile=mode))
        model = tuner.build_model(create_encoder(SPEC))
        keys = list(model.state_dict())
        state = tuner.init_state(model, total_steps=2)
        assert isinstance(state.forward, CompiledCall) is compiled
        if not compiled:
            assert state.forward is model
        assert list(model.state_dict()) == keys
