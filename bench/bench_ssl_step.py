"""Images/s of one DINO training step: a straightforward fp32 eager baseline against SSLTrainer's step.

The baseline is written the way facebookresearch/dino's training loop works (our own code, same
recipe): crops concatenated per resolution, DINO's explicit attention (q @ k^T, softmax) instead of
fused SDPA, a weight-normalised last layer recomputed from (g, v), the loss as a double loop over
view pairs, per-tensor gradient clipping in a Python loop, AdamW's default (per-tensor) kernels, and
the teacher EMA as a Python loop over parameters; fp32, no autocast.

Ours: `SSLTrainer.train_step` (bf16 autocast where the device runs it natively, fused SDPA attention,
fused AdamW, multi-tensor clipping and EMA, one contraction for all view pairs). Both run the same
DINO objective on the same random crops; step times are measured interleaved (baseline, ours,
baseline, ...) so load from other processes hits both alike, and the median is reported.

Then the loss trajectory over N steps from the same seed: our step in fp32 (amp off) against our
step as benchmarked (amp on), to show what mixed precision changes.

Configs: vit_ti8_64  ViT-Ti/8 at 64 px, 2x64 + 4x32 crops, batch 32, out_dim 4096
         vit_s16_224 ViT-S/16 at 224 px, 2x224 + 6x96 crops, batch 8, out_dim 65536
         vit_ti16_64 ViT-Ti/16 at 64 px, 2x64 + 4x32 crops, batch 32, out_dim 4096 (optional)
Target: ours >= 2.5x the baseline.

Usage: python bench/bench_ssl_step.py [--configs vit_ti8_64 vit_s16_224] [--steps 3] [--warmup 1]
                                      [--trajectory-steps 5] [--threads 2] [--no-fp32-breakdown] [--ibot]
                                      [--device cuda]   (on a GPU: the images/s figure for issue #7)
                                      [--batch-size 64] (every config at this batch size)
                                      [--compile auto|on|off] [--no-baseline]
Quick check: --configs vit_ti8_64 --steps 1 --trajectory-steps 0 --no-fp32-breakdown
Smoke (a tiny nano config, a few seconds): --smoke

Matmul peak: the same run times square matmuls in bf16 and fp32 with the same threads (the best of
several; a dtype the CPU only emulates gets a smaller size so it takes seconds, not minutes), and counts
our step's FLOPs (torch's FlopCounterMode: matmuls, attention, convolutions, forward and backward; it
lists no formula for PyTorch's CPU flash-attention kernels, so those get torch's own SDPA formulas, the
ones it applies to the CUDA kernels: ViT-Ti/8's step is 267.5 GFLOP with them, 255.1 without; nor for
the in-place `addmm_` of our ViT blocks, which gets its out-of-place twin's: without it the same step
would count 221.0). The
reference peak is that of the dtype our step computes in (bf16 where it is native, else fp32: on an
AVX2-only CPU bf16 is emulated ~50x below fp32 and the step runs fp32).

The fraction, measured so that a shared machine's load moves it little (issue #16's target: >= 75% for
vit_ti8_64 on CPU; the CPU model comes from lscpu):
- Clock: CPU time of this process on a CPU (time the scheduler gives other processes is not counted),
  wall clock on a GPU. Numerator and denominator always use the same clock.
- Rounds: each measured step is followed by the peak matmul repeated back to back for as long as that
  step took (`PeakProbe`), so step and peak are two samples of equal length under the same load. The
  figure is the median over the rounds of step GFLOP/s over probe GFLOP/s; min and max are printed
  beside it, so a reader sees the noise. Use --steps 10 or more for the figure (--warmup 2).
- Best-of-N: the fastest step over the fastest single peak matmul of the whole run (the best-of-5
  before the steps and every probe matmul): the same statistic for both; the machine at its quietest.
  Short matmuls catch quiet moments more easily than long steps, so this errs against the step.
Nothing here inflates the figure: FLOPs are counted, not estimated from the model, and the peak is the
best square matmul the machine does at the same thread count (1536-2048 px are the best sizes on the
AMD EPYC measured; use --matmul-size to try another).

torch.compile: `--compile on` times the compiled step ("ours") beside the eager one ("ours eager") and
prints `ratio compiled / eager`. On a GPU (issue #16's target, ViT-S/16 at batch 8 >= 2x compiled):
  python bench/bench_ssl_step.py --device cuda --configs vit_s16_224 --compile on --no-baseline --steps 10 --warmup 3
(auto = on with CUDA graphs there). On CPU use --threads 1 on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from visionfm_core.compile import COMPILE_MODES, compile_wanted
from visionfm_core.modalities import get_modality
from visionfm_core.models.encoders import EncoderSpec, create_encoder
from visionfm_core.ssl.config import SSLConfig
from visionfm_core.ssl.precision import ssl_autocast_dtype
from visionfm_core.ssl.schedules import schedule_at
from visionfm_core.ssl.trainer import SSLTrainer


@dataclass(frozen=True)
class BenchConfig:
    arch: str
    patch: int
    global_size: int
    local_size: int
    local_crops: int
    batch: int
    out_dim: int


CONFIGS = {
    "vit_ti8_64": BenchConfig("tiny", 8, 64, 32, 4, 32, 4096),
    "vit_s16_224": BenchConfig("small", 16, 224, 96, 6, 8, 65536),
    "vit_ti16_64": BenchConfig("tiny", 16, 64, 32, 4, 32, 4096),
    "smoke": BenchConfig("nano", 8, 32, 16, 2, 4, 256),
}
# DINO's head sizes (hidden 2048, bottleneck 256, 3 layers); teacher temperature warm-up 0.04 -> 0.07.
HEAD_HIDDEN, HEAD_BOTTLENECK = 2048, 256
CPU = torch.device("cpu")


def ssl_config(bench: BenchConfig, amp: bool) -> SSLConfig:
    return SSLConfig(objective="dino", out_dim=bench.out_dim, global_crops=2, local_crops=bench.local_crops,
                     global_crop_size=bench.global_size, local_crop_size=bench.local_size,
                     batch_size=bench.batch, amp=amp, warmup_teacher_temp=0.04, teacher_temp=0.07,
                     head_hidden_dim=HEAD_HIDDEN, head_bottleneck_dim=HEAD_BOTTLENECK, head_layers=3)


def random_crops(bench: BenchConfig, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sizes = [bench.global_size] * 2 + [bench.local_size] * bench.local_crops
    return [torch.randn(bench.batch, 3, s, s, generator=generator) for s in sizes]


# ------------------------------------------------------------------------------------------------
# Baseline: DINO's recipe written plainly, fp32 eager.


class BaselineHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        hidden, bottleneck = HEAD_HIDDEN, HEAD_BOTTLENECK
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        gain.data.fill_(1.0)
        gain.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))  # type: ignore[no-any-return]


class BaselineMultiCrop(nn.Module):
    """Backbone on each run of equal-resolution crops, [CLS] tokens concatenated, one head call."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        sizes = torch.tensor([c.shape[-1] for c in crops])
        ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0).tolist()
        outputs, start = [], 0
        for end in ends:
            tokens = self.backbone.forward_features(torch.cat(crops[start:end]))  # type: ignore[operator]
            outputs.append(tokens[:, 0])
            start = end
        return self.head(torch.cat(outputs))  # type: ignore[no-any-return]


class BaselineDINO:
    """fp32 eager DINO step with Python loops for the loss pairs, clipping and the EMA."""

    def __init__(self, bench: BenchConfig, cfg: SSLConfig, total_steps: int, seed: int = 0,
                 device: torch.device = CPU) -> None:
        torch.manual_seed(seed)
        spec = EncoderSpec(bench.arch, bench.global_size, bench.patch)
        self.student = BaselineMultiCrop(create_encoder(spec), BaselineHead(spec.embed_dim, bench.out_dim))
        self.teacher = BaselineMultiCrop(create_encoder(spec), BaselineHead(spec.embed_dim, bench.out_dim))
        for model in (self.student, self.teacher):
            for block in model.backbone.blocks:  # type: ignore[union-attr]
                block.attn.fused_attn = False  # DINO's explicit attention
        self.teacher.load_state_dict(self.student.state_dict())
        self.student.to(device)
        self.teacher.to(device)
        for p in self.teacher.parameters():
            p.requires_grad = False
        decay = [p for n, p in self.student.named_parameters() if p.requires_grad and p.ndim > 1
                 and not n.endswith(".bias")]
        plain = [p for n, p in self.student.named_parameters() if p.requires_grad and (p.ndim <= 1
                 or n.endswith(".bias"))]
        groups: list[dict[str, Any]] = [{"params": decay}, {"params": plain, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups)
        self.center = torch.zeros(1, bench.out_dim, device=device)
        self.cfg, self.total_steps, self.n_crops = cfg, total_steps, 2 + bench.local_crops

    def loss(self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        student_chunks = (student_out / self.cfg.student_temp).chunk(self.n_crops)
        teacher_chunks = F.softmax((teacher_out - self.center) / teacher_temp, dim=-1).detach().chunk(2)
        total, pairs = torch.zeros((), device=student_out.device), 0
        for iq, q in enumerate(teacher_chunks):
            for v, s in enumerate(student_chunks):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                pairs += 1
        with torch.no_grad():
            batch_center = teacher_out.sum(dim=0, keepdim=True) / len(teacher_out)
            self.center = self.center * self.cfg.center_momentum + batch_center * (1 - self.cfg.center_momentum)
        return total / pairs

    def step(self, crops: list[torch.Tensor], step: int) -> float:
        schedule = schedule_at(self.cfg, step, self.total_steps)
        teacher_out = self.teacher(crops[:2])
        student_out = self.student(crops)
        loss = self.loss(student_out, teacher_out, schedule.teacher_temp)
        self.optimizer.zero_grad()
        loss.backward()
        for p in self.student.parameters():
            if p.grad is not None:
                clip = self.cfg.clip_grad / (p.grad.data.norm(2) + 1e-6)
                if clip < 1:
                    p.grad.data.mul_(clip)
        if schedule.freeze_last_layer:
            for name, p in self.student.named_parameters():
                if "last_layer" in name:
                    p.grad = None
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = schedule.lr
            if i == 0:
                group["weight_decay"] = schedule.weight_decay
        self.optimizer.step()
        with torch.no_grad():
            m = schedule.teacher_momentum
            for param_q, param_k in zip(self.student.parameters(), self.teacher.parameters(), strict=True):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        return float(loss.detach())


# ------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], object], device: torch.device = CPU) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call; on CUDA, until the GPU has finished."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(bench: BenchConfig, steps: int, warmup: int, fp32_breakdown: bool,
            objective: str = "dino", device: torch.device = CPU, compile_mode: str = "off",
            with_baseline: bool = True, peak_probe: PeakProbe | None = None,
            ) -> tuple[dict[str, list[tuple[float, float]]], list[list[tuple[float, float]]]]:
    """(wall, CPU) seconds of every measured step per runner, and the peak probe's matmul times of every
    measured round. With a `compile_mode` that compiles on `device`, "ours" is the compiled step and
    "ours eager" the same step uncompiled. `peak_probe` runs after each round of steps for as long as
    "ours" took in that round, so each step is compared with a peak sample of the same length under the
    same load from other processes."""
    crops = [c.to(device) for c in random_crops(bench)]
    total = warmup + steps
    spec = EncoderSpec(bench.arch, bench.global_size, bench.patch)
    runners: dict[str, Callable[[int], object]] = {}
    if with_baseline:
        baseline = BaselineDINO(bench, ssl_config(bench, amp=False), total, device=device)
        runners["baseline fp32"] = lambda s: baseline.step(crops, s)
    ours = SSLTrainer(spec, get_modality("fundus"), ssl_config(bench, amp=True), total, device=device,
                      compile=compile_mode)
    runners["ours"] = lambda s: ours.train_step(crops, s)
    if compile_wanted(compile_mode, device):
        eager = SSLTrainer(spec, get_modality("fundus"), ssl_config(bench, amp=True), total, device=device,
                           compile="off")
        runners["ours eager"] = lambda s: eager.train_step(crops, s)
    if fp32_breakdown:
        ours_fp32 = SSLTrainer(spec, get_modality("fundus"), ssl_config(bench, amp=False), total, device=device)
        runners["ours fp32"] = lambda s: ours_fp32.train_step(crops, s)
    if objective == "ibot":
        ibot = SSLTrainer(spec, get_modality("fundus"), ssl_config(bench, amp=True).replace(objective="ibot"),
                          total, device=device)
        runners["ours iBOT"] = lambda s: ibot.train_step(crops, s)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    peak_rounds: list[list[tuple[float, float]]] = []
    clock = 0 if device.type == "cuda" else 1  # CPU time of this process on a CPU, wall clock on a GPU
    for step in range(total):
        took: dict[str, tuple[float, float]] = {}
        for name, run in runners.items():  # interleaved: a load spike hits every runner alike
            took[name] = timed(lambda run=run, step=step: run(step), device)  # type: ignore[misc]
        if peak_probe is not None:
            probe = peak_probe.run(took["ours"][clock], clock)
        if step >= warmup:
            for name, elapsed in took.items():
                times[name].append(elapsed)
            if peak_probe is not None:
                peak_rounds.append(probe)
    return times, peak_rounds


def images_per_s(batch: int, times: list[tuple[float, float]]) -> tuple[float, float]:
    """Median images/s (by wall clock, by this process's CPU time)."""
    return batch / statistics.median(w for w, _ in times), batch / statistics.median(c for _, c in times)


class PeakProbe:
    """The reference peak matmul (square, the step's dtype, the same threads), run between the steps.

    `run(seconds)` repeats the matmul back to back until it has taken `seconds` (the time the step
    before it took), timing each call: the step and its peak sample then last as long and share the
    same load from other processes.
    """

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.matrix = torch.randn(size, size, device=device).to(dtype)
        self.device = device
        self.gflop = 2 * size**3 / 1e9

    def run(self, seconds: float, clock: int = 1) -> list[tuple[float, float]]:
        """(wall, CPU) seconds of each matmul; `clock` 1 counts CPU time toward `seconds`, 0 wall time."""
        calls: list[tuple[float, float]] = []
        while not calls or sum(t[clock] for t in calls) < seconds:
            calls.append(timed(lambda: torch.matmul(self.matrix, self.matrix), self.device))
        return calls


@dataclass(frozen=True)
class PeakFraction:
    """A step's FLOP rate as a fraction of the peak matmul's, from interleaved measurements.

    per_round: each measured step against the peak probe that ran right after it for as long (both as
    GFLOP per second of the same clock): their median is the figure, min and max show the noise.
    best: the fastest step against the fastest single matmul of the whole run (the initial best-of-N
    included): the same statistic, best-of-N, for numerator and denominator; the best matmul is the
    machine's peak at its quietest, so this never flatters the step.
    """

    per_round: list[float]
    best: float

    @property
    def median(self) -> float:
        return statistics.median(self.per_round)

    def describe(self) -> str:
        return (f"median {self.median:.1%} of {len(self.per_round)} rounds (min {min(self.per_round):.1%}, "
                f"max {max(self.per_round):.1%}); best step / best matmul {self.best:.1%}")


def fraction_of_peak(step_gflop: float, step: list[tuple[float, float]], peak_gflop: float,
                     peak_rounds: list[list[tuple[float, float]]], best_peak_s: float,
                     clock: int = 1) -> PeakFraction:
    """The step's GFLOP/s over the peak matmul's on `clock` (1: CPU time of this process, 0: wall):
    per round against the probe run right after the step, and best step over best matmul (`best_peak_s`:
    the fastest matmul timed before the steps; the probes' matmuls count too)."""
    per_round = []
    for step_times, calls in zip(step, peak_rounds, strict=True):
        peak_rate = peak_gflop * len(calls) / max(sum(t[clock] for t in calls), 1e-9)
        per_round.append((step_gflop / max(step_times[clock], 1e-9)) / peak_rate)
    fastest_matmul = min([best_peak_s, *(t[clock] for calls in peak_rounds for t in calls)])
    best_step = min(t[clock] for t in step)
    return PeakFraction(per_round, (step_gflop / max(best_step, 1e-9)) / (peak_gflop / max(fastest_matmul, 1e-9)))


def matmul_peak(dtype: torch.dtype, device: torch.device, size: int, repeats: int = 5,
                budget_s: float = 5.0) -> tuple[float, float, int]:
    """(best GFLOP/s by wall clock, best GFLOP per CPU-second of this process, size used) of square
    matmuls in `dtype`: what the machine's kernels reach here.

    A dtype the CPU only emulates (bf16 without avx512_bf16/AMX runs ~100x below fp32) would take minutes
    at `size`; a 256 px probe estimates the time first and the size shrinks so one matmul fits `budget_s`
    (an emulated kernel is no faster at a larger size, so its peak is still its peak).
    """
    probe = 256
    a = torch.randn(probe, probe, device=device).to(dtype)
    torch.matmul(a, a)
    probe_s = min(timed(lambda: torch.matmul(a, a), device)[0] for _ in range(3))
    while size > probe and probe_s * (size / probe) ** 3 > budget_s:
        size //= 2
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.matmul(a, b)  # warm: kernel selection, caches
    times = [timed(lambda: torch.matmul(a, b), device) for _ in range(repeats)]
    flop = 2 * size**3 / 1e9
    return flop / min(w for w, _ in times), flop / max(min(c for _, c in times), 1e-9), size


def cpu_attention_flop_formulas() -> dict[Any, Callable[..., int]]:
    """FLOP formulas for PyTorch's CPU flash-attention kernels, which FlopCounterMode does not list (it
    counts 0 for them, while it counts the CUDA flash, memory-efficient and cuDNN kernels): the same
    formulas torch uses for those (two matmuls forward, q @ k^T and p @ v; four backward)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    def forward(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return int(sdpa_flop_count(query, key, value))

    def backward(grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None,
                 **kwargs: Any) -> int:
        return int(sdpa_backward_flop_count(grad_out, query, key, value))

    aten = torch.ops.aten
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return {}
    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def in_place_matmul_flop_formulas() -> dict[Any, Callable[..., int]]:
    """FlopCounterMode lists `addmm` but not its in-place twin `addmm_` (it would count 0), which our ViT
    blocks use to add a residual branch's projection into x + bias (visionfm_core/ssl/blocks.py): the
    same matmul, counted with torch's own formula for it (2 m n k, the addition not counted)."""

    def addmm_(self_shape: Any, a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None,
               **kwargs: Any) -> int:
        (m, k), (_, n) = a_shape, b_shape
        return 2 * m * n * k

    return {torch.ops.aten.addmm_: addmm_}


def flop_formulas() -> dict[Any, Callable[..., int]]:
    """What `step_gflop` adds to FlopCounterMode's own formulas: kernels our step runs that it does not list."""
    return {**cpu_attention_flop_formulas(), **in_place_matmul_flop_formulas()}


def step_gflop(bench: BenchConfig, device: torch.device) -> float:
    """FLOPs of one of our training steps (forward and backward), in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = EncoderSpec(bench.arch, bench.global_size, bench.patch)
    trainer = SSLTrainer(spec, get_modality("fundus"), ssl_config(bench, amp=True), 2, device=device,
                         compile="off")  # FlopCounterMode counts eager ops; compiling changes no FLOPs
    crops = [c.to(device) for c in random_crops(bench)]
    counter = FlopCounterMode(display=False, custom_mapping=flop_formulas())
    with counter:
        trainer.train_step(crops, 0)
    return counter.get_total_flops() / 1e9


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def trajectory(bench: BenchConfig, steps: int) -> tuple[list[float], list[float]]:
    spec = EncoderSpec(bench.arch, bench.global_size, bench.patch)
    losses = []
    for amp in (False, True):
        trainer = SSLTrainer(spec, get_modality("fundus"), ssl_config(bench, amp=amp), steps, seed=0)
        losses.append([trainer.train_step(random_crops(bench, seed=s), s)["loss"] for s in range(steps)])
    return losses[0], losses[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["vit_ti8_64", "vit_s16_224"], choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=int, default=3, help="measured steps per runner (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    parser.add_argument("--trajectory-steps", type=int, default=5, help="0 skips the loss trajectory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (the GPU figure of issue #7)")
    parser.add_argument("--no-fp32-breakdown", action="store_true", help="skip our step without autocast")
    parser.add_argument("--ibot", action="store_true", help="also time our iBOT step (no baseline for it)")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="images per step for every config (0: each config's own; a GPU wants 64+)")
    parser.add_argument("--matmul-size", type=int, default=0, help="peak matmul size (0: 2048 CPU, 8192 GPU)")
    parser.add_argument("--compile", default="off", choices=COMPILE_MODES,
                        help="torch.compile our step (auto: CUDA only); when it compiles, the eager step "
                             "is timed beside it and the ratio printed")
    parser.add_argument("--no-baseline", action="store_true", help="skip the reference DINO step")
    parser.add_argument("--smoke", action="store_true", help="the tiny config, one step, small matmuls")
    args = parser.parse_args()
    if args.smoke:
        args.configs, args.steps, args.warmup, args.trajectory_steps = ["smoke"], 1, 1, 0
        args.no_fp32_breakdown, args.matmul_size = True, 256
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}")
    print(f"CPU: {cpu_model()}")
    print(f"torch {torch.__version__}, {args.threads} threads, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, load average at start {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs, compile {args.compile}")
    size = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    peaks: dict[str, float] = {}
    cpu_peaks: dict[str, float] = {}
    peak_sizes: dict[str, int] = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        peaks[name], cpu_peaks[name], used = matmul_peak(dtype, device, size)
        peak_sizes[name] = used
        print(f"matmul peak {name}: {peaks[name]:.1f} GFLOP/s by wall clock, {cpu_peaks[name]:.1f} GFLOP per "
              f"CPU-second ({used}x{used}, best of 5)")
    # The peak that matters is that of the dtype our step computes in: bf16 where it is native, else fp32
    # (on a CPU without avx512_bf16/AMX, bf16 is emulated far below fp32 and the step runs fp32).
    step_dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[ssl_autocast_dtype(device, True)]
    reference = step_dtype if step_dtype in peaks else "fp32"
    print(f"our step computes in {step_dtype}: its fraction is taken of the {reference} peak")
    print("images/s by wall clock, and per CPU-second of this process (less sensitive to other load)")
    ours_rates: dict[str, float] = {}
    for name in args.configs:
        bench = CONFIGS[name] if args.batch_size <= 0 else replace(CONFIGS[name], batch=args.batch_size)
        ref_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[reference]
        probe = PeakProbe(peak_sizes[reference], ref_dtype, device)
        times, peak_rounds = measure(bench, args.steps, args.warmup, not args.no_fp32_breakdown,
                                     "ibot" if args.ibot else "dino", device, args.compile, not args.no_baseline,
                                     peak_probe=probe)
        result = {name: images_per_s(bench.batch, t) for name, t in times.items()}
        print(f"\n{name}: ViT-{bench.arch}/{bench.patch}, 2x{bench.global_size} + {bench.local_crops}x"
              f"{bench.local_size} crops, batch {bench.batch}, out_dim {bench.out_dim}, DINO objective")
        for runner, (wall, cpu) in result.items():
            print(f"  {runner:<14} {wall:8.2f} images/s  {cpu:8.2f} images/CPU-s")
        ours_wall, ours_cpu = result["ours"]
        ours_rates[name] = ours_wall
        gflop = step_gflop(bench, device)
        probe_calls = [t for calls in peak_rounds for t in calls]
        probe_cpu = probe.gflop * len(probe_calls) / sum(c for _, c in probe_calls)
        print(f"  {gflop:.1f} GFLOP per step; peak probe between the steps: {len(probe_calls)} {reference} matmuls, "
              f"{probe_cpu:.1f} GFLOP per CPU-second on average, best "
              f"{probe.gflop / min(c for _, c in probe_calls):.1f}")
        # CPU time of this process on a CPU (what other processes' load distorts least), wall time on a GPU.
        clock, clock_name = (0, "wall clock") if device.type == "cuda" else (1, "CPU time")
        best_peak_s = probe.gflop / (peaks if clock == 0 else cpu_peaks)[reference]
        for runner in ("ours", "ours eager"):
            if runner in result:
                fraction = fraction_of_peak(gflop, times[runner], probe.gflop, peak_rounds, best_peak_s, clock)
                print(f"  {runner}: ratio to the {reference} matmul peak by {clock_name}: {fraction.describe()} "
                      f"(target >= 75%)")
        if "ours eager" in result:
            eager_wall, eager_cpu = result["ours eager"]
            print(f"  ratio compiled / eager: {ours_wall / eager_wall:.2f}x wall, {ours_cpu / eager_cpu:.2f}x CPU "
                  "time (GPU target: >= 2x for vit_s16_224 at batch 8)")
        if "baseline fp32" in result:
            base_wall, base_cpu = result["baseline fp32"]
            print(f"  ratio ours / baseline: {ours_wall / base_wall:.2f}x wall, {ours_cpu / base_cpu:.2f}x CPU time"
                  " (target >= 2.5x)")
            if "ours fp32" in result:
                fp32_wall, fp32_cpu = result["ours fp32"]
                print(f"  ratio ours fp32 / baseline (every lever but bf16): {fp32_wall / base_wall:.2f}x wall, "
                      f"{fp32_cpu / base_cpu:.2f}x CPU time")
        if args.trajectory_steps > 0:
            fp32, mixed = trajectory(bench, args.trajectory_steps)
            diffs = [abs(a - b) for a, b in zip(fp32, mixed, strict=True)]
            relative = max(d / abs(a) for d, a in zip(diffs, fp32, strict=True))
            print(f"  loss over {len(fp32)} steps, same seed: ours fp32 {[round(v, 4) for v in fp32]}")
            print(f"                                   ours      {[round(v, 4) for v in mixed]}")
            print(f"  max |difference| {max(diffs):.4f} (relative {relative:.3%})")
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")
    for name, rate in ours_rates.items():
        bench = CONFIGS[name]
        if args.batch_size > 0:
            bench = replace(bench, batch=args.batch_size)
        print(f"issue 2: ViT-{bench.arch}/{bench.patch} at {bench.global_size} px, our step: {rate:.2f} images/s")


if __name__ == "__main__":
    main()
