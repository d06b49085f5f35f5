"""DP-SGD step vs the non-private step on the same model and batch (target: private <= 2x), and the
cost of drawing DP noise from the CSPRNG instead of torch's generator.

Part 1, a classifier step (ViT + linear head, cross-entropy, AdamW) on one fixed batch:
  non-private (fused attention)  |  ours: client.privacy.dp_step (torch.func per-sample gradients)
  |  Opacus 1.6 GradSampleModule in "hooks", "functorch" and "ghost" (ghost clipping) modes.
Part 2, the pretraining step: SSLTrainer.train_step vs DPSSLTrainer.train_step (iBOT, 2 global +
2 local crops, each image's crops together as one DP sample), with secure noise (the default) and
with torch noise.
Part 3, noise alone: torch.randn vs strategies.secure_noise on a ViT-S-sized vector (22M values).

Measurement: every variant first runs `--warmup` untimed steps (allocator, vmap tracing, Opacus
hooks), then `--reps` rounds in which each variant runs once, the order reversed every other round
so that no variant always follows the same one. Each round gives a paired ratio (variant / baseline
of that round), so a burst of load from another process hits both sides of a ratio; the medians of
wall time, CPU time (all threads of this process) and of the paired ratios are printed, with the
spread (min-max) of the wall ratios. Random weights and inputs (timing does not depend on them).

Usage: python bench/bench_dp_step.py [--arch tiny] [--image-size 96] [--batch 16] [--reps 9]
       [--warmup 2] [--skip-opacus] [--skip-ssl] [--skip-noise]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from _bench import add_smoke_flag, print_cpu
from torch import Tensor, nn

from client.privacy.accountant import PrivacyBudget, SiteAccountant
from client.privacy.dp_ssl import DPSSLTrainer
from client.privacy.dp_step import NoiseSettings, dp_step
from client.privacy.noise import SecureNoise, noise_generator
from client.privacy.sampling import PoissonLoader
from strategies.protocol.dp_config import DPConfig
from visionfm_core.modalities import get_modality
from visionfm_core.models.encoders import EncoderSpec, create_encoder
from visionfm_core.ssl.config import SSLConfig
from visionfm_core.ssl.trainer import SSLTrainer

Step = Callable[[], None]


class Classifier(nn.Module):
    def __init__(self, spec: EncoderSpec, classes: int = 5) -> None:
        super().__init__()
        self.encoder = create_encoder(spec)
        self.fc = nn.Linear(spec.embed_dim, classes)

    def forward(self, images: Tensor) -> Tensor:
        # The encoder's own forward ([CLS] pooled, num_classes=0): Opacus computes the per-sample
        # gradients of cls_token / pos_embed in a hook on that call.
        return self.fc(self.encoder(images))


def classifier_steps(spec: EncoderSpec, batch: int, with_opacus: bool) -> dict[str, Step]:
    images = torch.randn(batch, 3, spec.image_size, spec.image_size)
    labels = torch.randint(0, 5, (batch,))
    steps: dict[str, Step] = {}

    torch.manual_seed(0)
    plain = Classifier(spec).train()
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-4)

    def non_private() -> None:
        plain_opt.zero_grad(set_to_none=True)
        F.cross_entropy(plain(images), labels).backward()
        plain_opt.step()

    steps["non-private"] = non_private

    torch.manual_seed(0)
    ours = Classifier(spec).train()
    ours_opt = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    settings = NoiseSettings(max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=batch)
    generator = noise_generator("cpu")
    sample_batch = {"image": images, "label": labels}

    def sample_loss(model: nn.Module, sample: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(model(sample["image"].unsqueeze(0)), sample["label"].unsqueeze(0))

    def private_ours() -> None:
        dp_step(ours, sample_loss, sample_batch, settings, generator)
        ours_opt.step()

    steps["dp_step (ours)"] = private_ours
    if with_opacus:
        for mode in ("hooks", "functorch", "ghost"):
            steps[f"opacus {mode}"] = opacus_step(spec, mode, images, labels)
    return steps


def opacus_step(spec: EncoderSpec, mode: str, images: Tensor, labels: Tensor) -> Step:
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    model = Classifier(spec).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, labels), batch_size=len(labels)
    )
    engine = PrivacyEngine()
    criterion = nn.CrossEntropyLoss()
    kwargs = {"criterion": criterion} if mode == "ghost" else {}
    made = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
        grad_sample_mode=mode,
        **kwargs,
    )
    private_model, private_opt = made[0], made[1]
    loss_fn = made[2] if mode == "ghost" else criterion

    def step() -> None:
        private_opt.zero_grad(set_to_none=True)
        loss_fn(private_model(images), labels).backward()
        private_opt.step()

    return step


def ssl_steps(spec: EncoderSpec, batch: int) -> dict[str, Step]:
    local = max(spec.patch_size, spec.image_size // 2 // spec.patch_size * spec.patch_size)
    cfg = SSLConfig(
        objective="ibot",
        local_crops=2,
        local_crop_size=local,
        batch_size=batch,
        freeze_last_layer_fraction=0.0,
    )
    views = [torch.randn(batch, 3, spec.image_size, spec.image_size) for _ in range(2)]
    views += [torch.randn(batch, 3, local, local) for _ in range(2)]
    fundus = get_modality("fundus")
    plain = SSLTrainer(spec, fundus, cfg, total_steps=1000)
    private = DPSSLTrainer(
        spec,
        fundus,
        cfg,
        1000,
        DPConfig(expected_batch_size=batch),
        SiteAccountant(PrivacyBudget(math.inf, 1e-6)),
    )
    torch_noise = DPSSLTrainer(
        spec,
        fundus,
        cfg,
        1000,
        DPConfig(expected_batch_size=batch, secure_noise=False),
        SiteAccountant(PrivacyBudget(math.inf, 1e-6)),
    )
    for trainer in (private, torch_noise):
        trainer.use_sampling(PoissonLoader(list(range(100 * batch)), batch, list))
    counter = {"plain": 0, "private": 0, "torch noise": 0}

    def non_private() -> None:
        plain.train_step(views, counter["plain"])
        counter["plain"] += 1

    def dp() -> None:
        private.train_step(views, counter["private"])
        counter["private"] += 1

    def dp_torch_noise() -> None:
        torch_noise.train_step(views, counter["torch noise"])
        counter["torch noise"] += 1

    return {"SSLTrainer step": non_private, "DPSSLTrainer step": dp, "DPSSLTrainer (torch noise)": dp_torch_noise}


@dataclass
class Timings:
    """Per-round wall and CPU seconds of one variant."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def measure(steps: dict[str, Step], reps: int, warmup: int) -> dict[str, Timings]:
    for _ in range(warmup):
        for step in steps.values():
            step()
    timings = {name: Timings() for name in steps}
    names = list(steps)
    for round_index in range(reps):
        for name in names if round_index % 2 == 0 else names[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            steps[name]()
            timings[name].wall.append(time.perf_counter() - wall)
            timings[name].cpu.append(time.process_time() - cpu)
    return timings


def report(title: str, timings: dict[str, Timings], baseline: str) -> None:
    base = timings[baseline]
    print(f"\n{title}")
    header = f"{'variant':<26} {'wall s':>8} {'cpu s':>8} {'x wall':>7} {'x cpu':>7} {'x wall min-max':>15}"
    print(f"(x: median ratio of each round's time to the {baseline!r} baseline's in the same round)")
    print(header)
    for name, t in timings.items():
        wall_ratios = [a / b for a, b in zip(t.wall, base.wall, strict=True)]
        cpu_ratios = [a / b for a, b in zip(t.cpu, base.cpu, strict=True)]
        spread = f"{min(wall_ratios):.2f}-{max(wall_ratios):.2f}"
        print(
            f"{name:<26} {statistics.median(t.wall):>8.3f} {statistics.median(t.cpu):>8.3f} "
            f"{statistics.median(wall_ratios):>7.2f} {statistics.median(cpu_ratios):>7.2f} {spread:>15}",
            flush=True,
        )


def noise_steps(values: int) -> dict[str, Step]:
    generator = torch.Generator().manual_seed(0)
    secure = SecureNoise()
    shape = (values,)
    cpu = torch.device("cpu")

    def torch_randn() -> None:
        torch.randn(shape, generator=generator)

    def csprng() -> None:
        secure.gaussian(shape, cpu)

    return {"torch.randn": torch_randn, "secure (AES-CTR)": csprng}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="tiny")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-opacus", action="store_true")
    parser.add_argument("--skip-ssl", action="store_true")
    parser.add_argument("--skip-noise", action="store_true")
    parser.add_argument("--noise-values", type=int, default=22_000_000, help="ViT-S/16 has about 22M")
    add_smoke_flag(parser)
    args = parser.parse_args()
    if args.smoke:
        args.arch, args.image_size, args.batch, args.reps, args.warmup = "nano", 32, 2, 1, 0
        args.noise_values, args.skip_ssl = 100_000, True
    print_cpu()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Opacus' secure-RNG and alpha-range notices
    spec = EncoderSpec(arch=args.arch, image_size=args.image_size, patch_size=16)
    print(
        f"ViT-{args.arch} {args.image_size} px, batch {args.batch}, {args.threads} threads, "
        f"{args.warmup} warm-up + {args.reps} timed rounds (median)"
    )
    report(
        "classifier step (encoder + linear head, cross-entropy, AdamW)",
        measure(classifier_steps(spec, args.batch, not args.skip_opacus), args.reps, args.warmup),
        "non-private",
    )
    if not args.skip_ssl:
        report(
            "iBOT pretraining step (2 global + 2 local crops per image)",
            measure(ssl_steps(spec, args.batch), args.reps, args.warmup),
            "SSLTrainer step",
        )
    if not args.skip_noise:
        report(
            f"Gaussian noise, {args.noise_values:,} float32 values",
            measure(noise_steps(args.noise_values), args.reps, args.warmup),
            "torch.randn",
        )


if __name__ == "__main__":
    main()
