"""DP-SGD step vs the non-private step on the same model and batch (target: private <= 2x).

Part 1, a classifier step (ViT + linear head, cross-entropy, AdamW) on one fixed batch:
  non-private (fused attention)  |  ours: client.privacy.dp_step (torch.func per-sample gradients)
  |  Opacus 1.6 GradSampleModule in "hooks", "functorch" and "ghost" (ghost clipping) modes.
Part 2, the pretraining step: SSLTrainer.train_step vs DPSSLTrainer.train_step (iBOT, 2 global +
2 local crops, each image's crops together as one DP sample).

Every variant runs the same number of timed repetitions, interleaved round-robin so that load from
other processes hits them alike; the median is reported with its ratio to the non-private median of
the same run. Random weights and inputs (timing does not depend on them).

Usage: python bench/bench_dp_step.py [--arch tiny] [--image-size 96] [--batch 16] [--reps 3]
       [--skip-opacus] [--skip-ssl]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from client.privacy.accountant import PrivacyBudget, SiteAccountant
from client.privacy.config import DPConfig
from client.privacy.dp_ssl import DPSSLTrainer
from client.privacy.dp_step import NoiseSettings, dp_step, noise_generator
from client.privacy.sampling import PoissonLoader
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
    private.use_sampling(PoissonLoader(list(range(100 * batch)), batch, list))
    counter = {"plain": 0, "private": 0}

    def non_private() -> None:
        plain.train_step(views, counter["plain"])
        counter["plain"] += 1

    def dp() -> None:
        private.train_step(views, counter["private"])
        counter["private"] += 1

    return {"SSLTrainer step": non_private, "DPSSLTrainer step": dp}


def measure(steps: dict[str, Step], reps: int) -> dict[str, float]:
    for step in steps.values():  # warm-up: allocator, vmap tracing, Opacus hooks
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def report(title: str, medians: dict[str, float], baseline: str) -> None:
    print(f"\n{title}")
    print(f"{'variant':<22} {'median s':>9} {'x non-private':>14}")
    for name, seconds in medians.items():
        print(f"{name:<22} {seconds:>9.3f} {seconds / medians[baseline]:>14.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="tiny")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-opacus", action="store_true")
    parser.add_argument("--skip-ssl", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Opacus' secure-RNG and alpha-range notices
    spec = EncoderSpec(arch=args.arch, image_size=args.image_size, patch_size=16)
    print(
        f"ViT-{args.arch} {args.image_size} px, batch {args.batch}, {args.threads} threads, "
        f"{args.reps} timed reps (median)"
    )
    report(
        "classifier step (encoder + linear head, cross-entropy, AdamW)",
        measure(classifier_steps(spec, args.batch, not args.skip_opacus), args.reps),
        "non-private",
    )
    if not args.skip_ssl:
        report(
            "iBOT pretraining step (2 global + 2 local crops per image)",
            measure(ssl_steps(spec, args.batch), args.reps),
            "SSLTrainer step",
        )


if __name__ == "__main__":
    main()
