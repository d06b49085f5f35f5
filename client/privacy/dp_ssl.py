"""DP-SGD for DINO/iBOT pretraining: `DPSSLTrainer`, an `SSLTrainer` whose optimisation step clips and
noises each image's gradient.

The privacy unit is one image with all its crops: each image's views go through the student as one
sample (global views together, each local resolution together), so its gradient sums over all its
crops before it is clipped. Teacher targets are centred with the centre from earlier batches only
(DINO's order), so no image changes another image's gradient. The centre itself is computed from
private images; with `DPConfig.center == "noised"` each image's teacher output is clipped and the
batch sum noised (charged to the accountant together with the gradient), with "fixed" it never
changes. The EMA teacher is a function of the DP student alone (post-processing), as are AdamW and
the schedules. Batches must come from a `PoissonLoader`, whose sample rate the accountant charges.

What leaves the site and what stays is the same as for `SSLTrainer`; `local_state` also carries the
accountant's history (`privacy.history`). Metrics: `SSLTrainer`'s plus epsilon; the loss terms are
computed from images without noise, so only `client.privacy.reporting.releasable_metrics(...)`
should leave the site.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from client.privacy.accountant import SiteAccountant, combined_noise_multiplier
from client.privacy.dp_step import DPStepResult, NoiseSettings, PerSampleLoss, dp_step
from client.privacy.noise import noise_generator
from client.privacy.sampling import PoissonLoader
from client.privacy.view_packing import encode_views
from strategies.protocol.dp_config import DPConfig
from visionfm_core.data.batches import cycle_batches
from visionfm_core.errors import ConfigError
from visionfm_core.modalities import Modality
from visionfm_core.models.encoders import EncoderSpec
from visionfm_core.ssl.config import SSLConfig
from visionfm_core.ssl.ema import ema_update_
from visionfm_core.ssl.losses import dino_cls_loss, ibot_patch_loss, teacher_probs
from visionfm_core.ssl.network import SSLNetwork
from visionfm_core.ssl.precision import autocast_context
from visionfm_core.ssl.schedules import StepSchedule, schedule_at
from visionfm_core.ssl.trainer import SSLTrainer

Views = Sequence[Tensor]


@dataclass
class _TeacherOutputs:
    """Per-image targets for the student and the per-image rows that feed the centres."""

    samples: dict[str, Tensor]
    cls_rows: Tensor  # [B, K]: each image's teacher [CLS] logits, averaged over its global views
    patch_rows: Tensor | None  # [B, K]: each image's teacher patch logits, averaged over views and tokens


class DPSSLTrainer(SSLTrainer):
    """`SSLTrainer` with sample-level DP-SGD (see the module docstring).

    `accountant` is the site's (shared by every trainer that sees the same images); `noise_seed` is
    for tests only: by default the noise generator is seeded from the OS.
    """

    compile_refusal = ("DP-SGD computes per-sample gradients (torch.func vmap) on its own path, which "
                       "compilation would not cover; the step runs eagerly")

    def __init__(
        self,
        spec: EncoderSpec,
        modality: Modality,
        cfg: SSLConfig,
        total_steps: int,
        dp: DPConfig,
        accountant: SiteAccountant,
        device: torch.device | str = "cpu",
        seed: int = 0,
        noise_seed: int | None = None,
    ) -> None:
        super().__init__(spec, modality, cfg, total_steps, device=device, seed=seed)
        self.dp = dp
        self.accountant = accountant
        self.noise = noise_generator(self.device, noise_seed, secure=dp.secure_noise)
        # fp16 would need loss scaling inside every per-sample gradient; run such devices in fp32.
        self.dp_autocast = self.amp_dtype if self.amp_dtype == torch.bfloat16 else None
        if getattr(self.student, "token_dtype", None) is not None:
            # A bf16 residual stream breaks vmap's backward (LayerNorm(x + mlp(x)) under autocast raises
            # "expected scalar type BFloat16 but found Float", torch 2.14); the student keeps fp32
            # tokens, its matmuls still run in bf16.
            self.student.token_dtype = None
        self.center_clip = dp.center_clip or 2.0 * math.sqrt(cfg.out_dim / cfg.head_bottleneck_dim)
        self.sampling: tuple[float, float] | None = None  # (sample rate, expected batch size)
        self.last_step: DPStepResult = DPStepResult()

    # ----------------------------------------------------------------------------------------------
    # Privacy bookkeeping

    def effective_noise_multiplier(self) -> float:
        """The noise multiplier the accountant charges per step: gradient and noised centres together."""
        if self.dp.center == "fixed":
            return self.dp.noise_multiplier
        centres = 2 if self.ibot else 1
        return combined_noise_multiplier(
            self.dp.noise_multiplier, *[self.dp.center_noise_multiplier] * centres
        )

    def use_sampling(self, loader: PoissonLoader[Any]) -> None:
        """Take the sample rate and expected batch size from a Poisson loader (train_steps does this)."""
        if not isinstance(loader, PoissonLoader):
            raise ConfigError(
                "loader",
                "DP-SGD needs Poisson-sampled batches (client.privacy.PoissonLoader), "
                f"got {type(loader).__name__}: the accountant's guarantee assumes them",
            )
        if self.accountant.budget.delta >= 1.0 / loader.dataset_size:
            raise ConfigError(
                "privacy.delta",
                f"{self.accountant.budget.delta:g} is not below 1/{loader.dataset_size}"
                " (one over the number of training images)",
            )
        self.sampling = (loader.sample_rate, loader.expected_batch_size)

    def local_state(self) -> dict[str, Tensor]:
        state = super().local_state()
        state.update(self.accountant.state_tensors())
        return state

    def load_local_state(self, state: Mapping[str, Tensor]) -> None:
        super().load_local_state(state)
        self.accountant.load_state_tensors(state)

    # ----------------------------------------------------------------------------------------------
    # Training

    def train_steps(self, loader: Iterable[Any], num_steps: int, start_step: int) -> dict[str, float]:
        """`num_steps` DP steps on Poisson batches from `loader` (a PoissonLoader). Refuses the whole round
        with PrivacyBudgetExceeded, before any step, if it would exceed the site's budget."""
        if num_steps < 1:
            raise ConfigError("num_steps", f"must be >= 1, got {num_steps}")
        self.use_sampling(loader)  # type: ignore[arg-type]
        sample_rate, _ = self._require_sampling()
        self.accountant.check(num_steps, self.effective_noise_multiplier(), sample_rate)
        self.student.train()
        self.teacher.eval()
        batches = cycle_batches(loader, "the Poisson loader")
        sums = dict.fromkeys(
            ("loss", "loss_cls", "loss_patch", "lr", "teacher_temp", "teacher_momentum"), 0.0
        )
        losses_seen, images, clipped = 0, 0, 0
        started = time.perf_counter()
        for i in range(num_steps):
            batch = next(batches)
            step = start_step + i
            schedule = schedule_at(self.cfg, step, self.total_steps)
            losses = self._dp_train_step(None if batch is None else batch[0], step, schedule)
            if self.last_step.samples > self.last_step.nonfinite:
                losses_seen += 1
                for key, value in losses.items():
                    sums[key] += value
            sums["lr"] += schedule.lr
            sums["teacher_temp"] += schedule.teacher_temp
            sums["teacher_momentum"] += schedule.teacher_momentum
            images += self.last_step.samples
            clipped += self.last_step.clipped
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = max(time.perf_counter() - started, 1e-9)
        metrics = {
            k: v / num_steps for k, v in sums.items() if k in ("lr", "teacher_temp", "teacher_momentum")
        }
        for key in ("loss", "loss_cls", "loss_patch"):
            metrics[key] = sums[key] / losses_seen if losses_seen else float("nan")
        metrics.update(self.privacy_metrics())
        metrics.update(
            images=float(images),
            images_per_s=images / elapsed,
            steps=float(num_steps),
            clipped_fraction=clipped / images if images else 0.0,
        )
        return metrics

    def privacy_metrics(self) -> dict[str, float]:
        """epsilon spent so far, the budget, and the mechanism of the last round."""
        sample_rate = self.sampling[0] if self.sampling else float("nan")
        return {
            "epsilon": self.accountant.epsilon_spent(),
            "delta": self.accountant.budget.delta,
            "epsilon_budget": self.accountant.budget.epsilon,
            "noise_multiplier": self.effective_noise_multiplier(),
            "sample_rate": sample_rate,
        }

    def train_step(
        self, views: Views | None, step: int, schedule: StepSchedule | None = None
    ) -> dict[str, float]:
        """One DP step on one Poisson batch (None: an empty draw, noise only). Needs `use_sampling` first;
        refuses with PrivacyBudgetExceeded if the step would exceed the budget."""
        sample_rate, _ = self._require_sampling()
        self.accountant.check(1, self.effective_noise_multiplier(), sample_rate)
        return self._dp_train_step(views, step, schedule or schedule_at(self.cfg, step, self.total_steps))

    def _dp_train_step(self, views: Views | None, step: int, schedule: StepSchedule) -> dict[str, float]:
        sample_rate, expected = self._require_sampling()
        settings = NoiseSettings(self.dp.max_grad_norm, self.dp.noise_multiplier, expected)
        step_seed = int(np.random.SeedSequence([self.seed, int(step)]).generate_state(1)[0])
        inputs = None
        if views is not None and int(views[0].shape[0]) > 0:
            checked = self._check_views(views)
            masks = self._draw_masks(checked[0], np.random.default_rng(step_seed)) if self.ibot else None
            inputs = self.teacher_outputs(checked, masks, schedule)
        cuda_rng = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_rng):
            torch.manual_seed(step_seed)  # drop-path draws, as in SSLTrainer
            result = dp_step(
                self.student,
                self.image_loss(schedule),
                None if inputs is None else inputs.samples,
                settings,
                self.noise,
                trainable=self.trainable_names(schedule),
                autocast_dtype=self.dp_autocast,
                microbatch_size=self.dp.microbatch_size,
            )
        self._apply_update(schedule)
        if self.dp.center == "noised":
            self._noised_center_update(self.center_cls, None if inputs is None else inputs.cls_rows, expected)
            if self.ibot:
                self._noised_center_update(
                    self.center_patch, None if inputs is None else inputs.patch_rows, expected
                )
        self.accountant.spend(self.effective_noise_multiplier(), sample_rate, 1)
        self.step = step + 1
        self._teacher_fresh = False
        self.last_step = result
        finite = max(result.samples - result.nonfinite, 1)
        return {
            "loss": result.mean_loss,
            "loss_cls": result.aux_sums.get("loss_cls", 0.0) / finite,
            "loss_patch": result.aux_sums.get("loss_patch", 0.0) / finite,
        }

    def trainable_names(self, schedule: StepSchedule) -> list[str]:
        """Student parameters this step trains (the last layer is left out while it is frozen)."""
        frozen = {id(p) for p in self._last_layer} if schedule.freeze_last_layer else set()
        return [n for n, p in self.student.named_parameters() if p.requires_grad and id(p) not in frozen]

    @torch.no_grad()
    def teacher_outputs(
        self, views: list[Tensor], masks: Tensor | None, schedule: StepSchedule
    ) -> _TeacherOutputs:
        """Image-aligned student inputs and teacher targets (centres from earlier batches only).

        samples: "global" [B, G, 3, H, W], "local<j>" [B, L_j, 3, h, w] per local resolution, "targets"
        [B, G, K]; for iBOT also "masks" [B, G, h, w], "patch_targets" [B, G, N, K] and "patch_weights"
        [B, G, N] (1 / (masked tokens of that view * G) on masked tokens, so the mean over images of
        each image's loss is SSLTrainer's batch loss).
        """
        cfg = self.cfg
        n_global, batch = cfg.global_crops, int(views[0].shape[0])
        samples: dict[str, Tensor] = {"global": torch.stack(views[:n_global], dim=1)}
        for j, group in enumerate(_local_groups(views[n_global:])):
            samples[f"local{j}"] = torch.stack(group, dim=1)
        prefix = int(getattr(self.teacher.backbone, "num_prefix_tokens", 1))
        with autocast_context(self.device, self.dp_autocast):
            tokens = self.teacher.encode(torch.cat(views[:n_global]))  # [G*B, 1+N, D], view-major
            t_cls = self.teacher.head(tokens[:, 0]).float().view(n_global, batch, -1)
            t_patch = self.teacher.head(tokens[:, prefix:]).float() if masks is not None else None
        samples["targets"] = teacher_probs(t_cls, self.center_cls, schedule.teacher_temp).transpose(0, 1)
        patch_rows = None
        if masks is not None and t_patch is not None:
            t_patch = t_patch.view(n_global, batch, t_patch.shape[1], -1)  # [G, B, N, K]
            samples["masks"] = masks.transpose(0, 1)
            probs = teacher_probs(t_patch, self.center_patch, schedule.patch_teacher_temp)
            samples["patch_targets"] = probs.transpose(0, 1)
            flat = masks.flatten(2).float()  # [G, B, N]
            weights = flat / (flat.sum(-1, keepdim=True).clamp(min=1.0) * n_global)
            samples["patch_weights"] = weights.transpose(0, 1)
            patch_rows = t_patch.mean(dim=(0, 2))
        return _TeacherOutputs({k: v.contiguous() for k, v in samples.items()}, t_cls.mean(dim=0), patch_rows)

    def image_loss(self, schedule: StepSchedule) -> PerSampleLoss:
        """The per-image loss for `dp_step`: DINO's [CLS] loss over the image's own views (+ iBOT's)."""
        cfg = self.cfg
        ibot = self.ibot

        def loss(student: nn.Module, sample: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
            assert isinstance(student, SSLNetwork)
            local_keys = sorted((k for k in sample if k.startswith("local")), key=lambda k: int(k[5:]))
            groups = [(sample["global"], sample.get("masks"))] + [(sample[k], None) for k in local_keys]
            # All views in one pass: one per-image gradient per weight (see view_packing).
            encoded = encode_views(student, groups)
            tokens = encoded[0]  # [G, 1+N, D]
            head_in = torch.cat([group[:, 0] for group in encoded])
            n_views = head_in.shape[0]
            if ibot:
                prefix = int(getattr(student.backbone, "num_prefix_tokens", 1))
                # Every patch token goes through the head (vmap needs fixed shapes); weights pick the masked.
                head_in = torch.cat([head_in, tokens[:, prefix:].flatten(0, 1)])
            out = student.head(head_in)
            loss_cls = dino_cls_loss(
                out[:n_views].unsqueeze(1), sample["targets"].unsqueeze(1), cfg.student_temp
            )
            total = cfg.lambda_cls * loss_cls
            terms = {"loss_cls": loss_cls}
            if ibot:
                loss_patch = ibot_patch_loss(
                    out[n_views:],
                    sample["patch_targets"].flatten(0, 1),
                    sample["patch_weights"].flatten(),
                    cfg.student_temp,
                )
                total = total + cfg.lambda_patch * loss_patch
                terms["loss_patch"] = loss_patch
            return total, terms

        return loss

    def _apply_update(self, schedule: StepSchedule) -> None:
        """AdamW on the DP gradient with the scheduled lr / weight decay, then the teacher EMA."""
        decay_group, no_decay_group = self.optimizer.param_groups
        for group in (decay_group, no_decay_group):
            group["lr"] = schedule.lr
        decay_group["weight_decay"] = schedule.weight_decay
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        ema_update_(self._teacher_params, self._student_params, schedule.teacher_momentum)

    @torch.no_grad()
    def _noised_center_update(self, center: Tensor, rows: Tensor | None, expected: float) -> None:
        """center <- m * center + (1 - m) * (sum_i clip(row_i) + N(0, (s * C)^2)) / expected batch size."""
        clip = self.center_clip
        total = torch.zeros_like(center, dtype=torch.float32)
        if rows is not None and rows.shape[0] > 0:
            norms = torch.linalg.vector_norm(rows.float(), dim=1, keepdim=True)
            finite = torch.isfinite(norms)
            scaled = rows.float() * (clip / (norms + 1e-6)).clamp(max=1.0)
            total += torch.where(finite, scaled, torch.zeros_like(scaled)).sum(dim=0)
        noise = self.noise.gaussian(center.shape, center.device)
        batch_center = (total + self.dp.center_noise_multiplier * clip * noise) / expected
        momentum = self.cfg.center_momentum
        center.mul_(momentum).add_(batch_center.to(center.dtype), alpha=1.0 - momentum)

    def _require_sampling(self) -> tuple[float, float]:
        if self.sampling is None:
            raise ConfigError(
                "loader",
                "no Poisson sampling set: call train_steps with a PoissonLoader "
                "(or use_sampling(loader)) first",
            )
        return self.sampling


def _local_groups(views: Sequence[Tensor]) -> list[list[Tensor]]:
    """Consecutive local views of equal size: each group is one forward pass per image."""
    groups: list[list[Tensor]] = []
    for view in views:
        if groups and groups[-1][0].shape == view.shape:
            groups[-1].append(view)
        else:
            groups.append([view])
    return groups
