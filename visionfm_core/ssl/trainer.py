"""One DINO/iBOT trainer for a site: student + EMA teacher, multi-crop step, state split for FL.

What leaves the site (`shared_state`): the student backbone (timm keys under `backbone.`) and, when
`cfg.share_head`, the projection head (`head.`). What stays (`local_state`): the teacher, the centres,
iBOT's mask token, an unshared head, the optimizer moments and the step counter.

Every random draw of a step (iBOT masks, drop-path) is seeded from (seed, global step), so the same
seed and data give the same losses, and a trainer rebuilt from its saved state continues exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from visionfm_core.compile import check_compile_mode, mark_step_begin, maybe_compile
from visionfm_core.data.batches import cycle_batches
from visionfm_core.distributed import DistContext
from visionfm_core.errors import CheckpointError, ConfigError, DataError, VisionFMError
from visionfm_core.modalities import Modality
from visionfm_core.models.encoders import EncoderSpec, create_encoder, validate_spec
from visionfm_core.ssl.config import SSLConfig
from visionfm_core.ssl.ema import ema_update_
from visionfm_core.ssl.head import ProjectionHead
from visionfm_core.ssl.losses import (
    dino_cls_loss,
    ibot_patch_loss,
    masked_token_weights,
    teacher_probs,
    update_center,
)
from visionfm_core.ssl.masking import BlockMaskGenerator
from visionfm_core.ssl.network import SSLNetwork, set_fused_attention
from visionfm_core.ssl.optim import build_optimizer, clip_gradients_, load_optimizer_state, optimizer_state
from visionfm_core.ssl.precision import autocast_context, make_grad_scaler, ssl_autocast_dtype
from visionfm_core.ssl.schedules import StepSchedule, schedule_at

logger = logging.getLogger(__name__)

TEACHER_SYNC_MODES = ("reset", "ema", "keep")
Batch = tuple[Sequence[torch.Tensor], torch.Tensor]


class TrainingDivergedError(VisionFMError):
    """The loss became NaN or infinite; the step was not applied, so the weights are the last good ones."""


@dataclasses.dataclass
class _StepOutput:
    loss: torch.Tensor
    loss_cls: torch.Tensor
    loss_patch: torch.Tensor
    teacher_cls_logits: torch.Tensor
    # Mean teacher logits over every patch token of the batch (what iBOT's patch centre follows).
    teacher_patch_mean: torch.Tensor | None


class SSLTrainer:
    """Self-supervised pretraining of one modality's encoder on one site (see module docstring)."""

    # Why a subclass's step must not be compiled (None: it may be); see visionfm_core/compile.py.
    compile_refusal: str | None = None

    def __init__(self, spec: EncoderSpec, modality: Modality, cfg: SSLConfig, total_steps: int,
                 device: torch.device | str = "cpu", seed: int = 0, dist: DistContext | None = None,
                 compile: str = "auto") -> None:
        """`dist`: this process is one worker of a multi-device site (its process group initialised): each
        worker trains on its own shard of the batch, gradients and the centres' batch statistics are
        averaged over the workers, so every worker holds the same student, teacher and centres.
        `compile`: "auto" (CUDA only), "on" or "off": torch.compile of the encoders and heads of the
        step (visionfm_core/compile.py); the networks and their state dicts are left as they are."""
        if total_steps < 1:
            raise ConfigError("total_steps", f"must be >= 1, got {total_steps}")
        self.spec = validate_spec(spec)
        self.modality = modality
        self.cfg = cfg
        self.total_steps = int(total_steps)
        self.device = torch.device(device)
        self.seed = int(seed)
        self.ibot = cfg.objective == "ibot"
        self.dist = dist if dist is not None and dist.world_size > 1 else None

        # Initialise under a private RNG so building a trainer never disturbs the caller's random stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.student = SSLNetwork(create_encoder(spec), self._new_head(), with_mask_token=self.ibot)
            teacher_spec = dataclasses.replace(spec, drop_path_rate=0.0)
            self.teacher = SSLNetwork(create_encoder(teacher_spec), self._new_head())
        self.teacher.load_state_dict(self.student.state_dict(), strict=False)
        self.student.to(self.device)
        self.teacher.to(self.device).eval().requires_grad_(False)
        self.backbone: nn.Module = self.student.backbone

        self._student_params = self.student.backbone_and_head_parameters()
        self._teacher_params = self.teacher.backbone_and_head_parameters()
        self._trainable = [p for p in self.student.parameters() if p.requires_grad]
        self._last_layer = list(self.student.head.last_layer.parameters())
        self._param_names = {p: n for n, p in self.student.named_parameters()}
        self.optimizer = build_optimizer(self.student, self.device)

        self.center_cls = torch.zeros(cfg.out_dim, device=self.device)
        self.center_patch = torch.zeros(cfg.out_dim, device=self.device)
        self.masker = BlockMaskGenerator(cfg.mask_prob, cfg.mask_ratio)
        self.amp_dtype = ssl_autocast_dtype(self.device, cfg.amp)
        self.scaler = make_grad_scaler(self.device, self.amp_dtype)
        # PyTorch's CPU flash-attention kernel is 3-7x slower in bf16 than explicit q @ k^T -> softmax -> @ v
        # (whose matmuls run on AMX) at ViT sequence lengths (measured fwd+bwd, 1 thread: 90 vs 17 ms at
        # 65 tokens, 90 vs 43 ms at 197). Keep the fused kernel everywhere else (CUDA, fp32 CPU).
        use_fused = not (self.device.type == "cpu" and self.amp_dtype == torch.bfloat16)
        for network in (self.student, self.teacher):
            set_fused_attention(network, use_fused)
            # bf16 keeps fp32's exponent range, so the residual stream may live in it; fp16 may not.
            network.token_dtype = torch.bfloat16 if self.amp_dtype == torch.bfloat16 else None
        self.compile_mode = check_compile_mode(compile)
        self._student_encode = self._compiled(self.student.encode, "the SSL student encoder")
        self._teacher_encode = self._compiled(self.teacher.encode, "the SSL teacher encoder")
        self._student_head = self._compiled(self.student.head, "the SSL student head")
        self._teacher_head = self._compiled(self.teacher.head, "the SSL teacher head")
        if self.dist is not None:  # same seed, same weights; made certain, so the workers never drift
            self.dist.broadcast_([*self.student.state_dict().values(), *self.teacher.state_dict().values()])
        self.step = 0
        # A teacher that is still the untrained copy made above: an "ema" sync then acts as a reset,
        # otherwise the first round would blend the global model with random weights.
        self._teacher_fresh = True

    def _compiled(self, fn: Any, what: str) -> Any:
        return maybe_compile(fn, self.compile_mode, self.device, what, refuse=self.compile_refusal)

    def _new_head(self) -> ProjectionHead:
        c = self.cfg
        return ProjectionHead(self.spec.embed_dim, c.out_dim, c.head_hidden_dim, c.head_bottleneck_dim,
                              c.head_layers)

    # ----------------------------------------------------------------------------------------------
    # State that travels (shared) and state that stays on the site (local)

    def shared_state(self) -> dict[str, torch.Tensor]:
        """Student backbone (`backbone.<timm key>`) and, if `cfg.share_head`, head (`head.<key>`):
        detached CPU copies that later training does not change."""
        state = {f"backbone.{k}": _cpu_copy(v) for k, v in self.student.backbone.state_dict().items()}
        if self.cfg.share_head:
            state.update({f"head.{k}": _cpu_copy(v) for k, v in self.student.head.state_dict().items()})
        return state

    def load_shared_state(self, state: Mapping[str, torch.Tensor], teacher_sync: str = "reset",
                          teacher_ema: float = 0.5) -> None:
        """Load global weights into the student, then follow with the teacher.

        teacher_sync: "reset" teacher := student; "ema" teacher := ema * teacher + (1 - ema) * student
        (FedEMA-style, keeps local knowledge; a never-trained teacher is reset instead); "keep" leaves
        the teacher alone. Without `head.` keys the local head stays as it is.
        """
        if teacher_sync not in TEACHER_SYNC_MODES:
            raise ConfigError("teacher_sync",
                              f"must be one of {', '.join(TEACHER_SYNC_MODES)}, got {teacher_sync!r}")
        if not 0.0 <= teacher_ema <= 1.0:
            raise ConfigError("teacher_ema", f"must be in [0, 1], got {teacher_ema}")
        unknown = sorted(k for k in state if not k.startswith(("backbone.", "head.")))
        if unknown:
            raise CheckpointError("<shared state>", f"unexpected keys {_preview(unknown)}")
        _load_strict(self.student.backbone, _strip(state, "backbone."), "backbone.")
        head_state = _strip(state, "head.")
        if head_state:
            _load_strict(self.student.head, head_state, "head.")
        if teacher_sync == "reset" or (teacher_sync == "ema" and self._teacher_fresh):
            with torch.no_grad():
                torch._foreach_copy_(list(self._teacher_params), [p.detach() for p in self._student_params])
            self._teacher_fresh = False
        elif teacher_sync == "ema":
            ema_update_(self._teacher_params, self._student_params, teacher_ema)

    def local_state(self) -> dict[str, torch.Tensor]:
        """Everything that must survive between rounds but never leaves the site, as flat CPU tensors."""
        state = {f"teacher.{k}": _cpu_copy(v) for k, v in self.teacher.state_dict().items()}
        state["center.cls"] = _cpu_copy(self.center_cls)
        if self.ibot:
            state["center.patch"] = _cpu_copy(self.center_patch)
            assert self.student.mask_token is not None
            state["student.mask_token"] = _cpu_copy(self.student.mask_token)
        if not self.cfg.share_head:
            head = self.student.head.state_dict()
            state.update({f"student.head.{k}": _cpu_copy(v) for k, v in head.items()})
        state.update(optimizer_state(self.optimizer, self._param_names, prefix="optim."))
        state["step"] = torch.tensor(self.step, dtype=torch.int64)
        return state

    def load_local_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what `local_state` returned (call it before `load_shared_state` of the next round).
        A key whose shape does not fit this trainer raises CheckpointError naming it."""
        teacher = _strip(state, "teacher.")
        if teacher:
            _load_strict(self.teacher, teacher, "teacher.")
            self._teacher_fresh = False
        with torch.no_grad():
            for key, target in (("center.cls", self.center_cls), ("center.patch", self.center_patch),
                                ("student.mask_token", self.student.mask_token)):
                if key in state and target is not None:
                    if state[key].shape != target.shape:
                        raise CheckpointError("<local state>", f"'{key}' has shape {tuple(state[key].shape)},"
                                              f" expected {tuple(target.shape)}")
                    target.copy_(state[key])
        head = _strip(state, "student.head.")
        if head:
            _load_strict(self.student.head, head, "student.head.")
        params = {n: p for p, n in self._param_names.items()}
        load_optimizer_state(self.optimizer, params, state, prefix="optim.")
        if "step" in state:
            self.step = int(state["step"])

    # ----------------------------------------------------------------------------------------------
    # Training

    def train_steps(self, loader: Iterable[Batch], num_steps: int, start_step: int) -> dict[str, float]:
        """Run `num_steps` optimisation steps (cycling `loader`), schedules at global steps
        `start_step + i` of `total_steps`. Returns means over the steps plus `images` and `images_per_s`."""
        if num_steps < 1:
            raise ConfigError("num_steps", f"must be >= 1, got {num_steps}")
        self.student.train()
        self.teacher.eval()
        batches = cycle_batches(loader)
        keys = ("loss", "loss_cls", "loss_patch", "lr", "teacher_temp", "teacher_momentum")
        sums = dict.fromkeys(keys, 0.0)
        images = 0
        started = time.perf_counter()
        for i in range(num_steps):
            views, _labels = next(batches)
            step = start_step + i
            schedule = schedule_at(self.cfg, step, self.total_steps)
            losses = self.train_step(views, step, schedule)
            for key, value in losses.items():
                sums[key] += value
            sums["lr"] += schedule.lr
            sums["teacher_temp"] += schedule.teacher_temp
            sums["teacher_momentum"] += schedule.teacher_momentum
            images += int(views[0].shape[0])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = max(time.perf_counter() - started, 1e-9)
        metrics = {key: value / num_steps for key, value in sums.items()}
        metrics["images"] = float(images)
        metrics["images_per_s"] = images / elapsed
        return metrics

    def train_step(self, views: Sequence[torch.Tensor], step: int,
                   schedule: StepSchedule | None = None) -> dict[str, float]:
        """One optimisation step on one multi-crop batch (global views first). Returns the loss terms."""
        schedule = schedule or schedule_at(self.cfg, step, self.total_steps)
        views = self._check_views(views)
        mark_step_begin(self.compile_mode, self.device)
        step_seed = int(np.random.SeedSequence([self.seed, int(step)]).generate_state(1)[0])
        masks = self._draw_masks(views[0], np.random.default_rng(step_seed)) if self.ibot else None
        cuda_rng = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_rng):
            torch.manual_seed(step_seed)  # drop-path draws
            out = self._forward(views, masks, schedule)
        reported = torch.stack([out.loss.detach().float(), out.loss_cls.float(), out.loss_patch.float()])
        if self.dist is not None:  # the whole batch's loss; every worker sees the same, so all stop together
            self.dist.mean_(reported)
        loss_value, loss_cls, loss_patch = (float(v) for v in reported.cpu())
        if not np.isfinite(loss_value):
            raise TrainingDivergedError(f"SSL loss is {loss_value} at step {step}; step skipped")
        self._optimise(out.loss, schedule)
        with torch.no_grad():
            update_center(self.center_cls, self._batch_mean(out.teacher_cls_logits), self.cfg.center_momentum)
            if out.teacher_patch_mean is not None:
                update_center(self.center_patch, self._batch_mean(out.teacher_patch_mean), self.cfg.center_momentum)
        self.step = step + 1
        self._teacher_fresh = False
        return {"loss": loss_value, "loss_cls": loss_cls, "loss_patch": loss_patch}

    def _batch_mean(self, logits: torch.Tensor) -> torch.Tensor:
        """The mean teacher logit row over the whole batch: over all workers' shards when distributed
        (an all-reduce of equal-sized shards' means), so the centres stay identical on every worker."""
        mean = logits.detach().float().reshape(-1, logits.shape[-1]).mean(dim=0, keepdim=True)
        if self.dist is not None:
            self.dist.mean_(mean)
        return mean

    def _check_views(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        expected = self.cfg.global_crops + self.cfg.local_crops
        if len(views) != expected:
            raise ConfigError("ssl.local_crops", f"batch has {len(views)} views, config expects {expected} "
                              f"({self.cfg.global_crops} global + {self.cfg.local_crops} local)")
        global_shapes = {tuple(v.shape) for v in views[: self.cfg.global_crops]}
        if len(global_shapes) != 1:
            raise DataError("<batch>", f"global views differ in shape: {sorted(global_shapes)}")
        return [v.to(self.device, non_blocking=True) for v in views]

    def _draw_masks(self, global_view: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        patch = self.student.patch_size
        height, width = global_view.shape[-2] // patch, global_view.shape[-1] // patch
        batch = global_view.shape[0]
        if self.dist is None:
            masks = self.masker.batch_masks(self.cfg.global_crops, batch, height, width, rng)
        else:
            # The masks of the whole batch, this worker's slice: as if one process trained the whole batch.
            every = self.masker.batch_masks(self.cfg.global_crops, batch * self.dist.world_size, height, width, rng)
            masks = every[:, self.dist.rank * batch:(self.dist.rank + 1) * batch]
        return masks.to(self.device, non_blocking=True)

    def _forward(self, views: list[torch.Tensor], masks: torch.Tensor | None,
                 schedule: StepSchedule) -> _StepOutput:
        cfg = self.cfg
        n_global, batch = cfg.global_crops, views[0].shape[0]
        global_images = torch.cat(views[:n_global])
        prefix = int(getattr(self.student.backbone, "num_prefix_tokens", 1))
        image_masks = masks.flatten(0, 1) if masks is not None else None  # [G*B, h, w]
        flat_masks = image_masks.flatten(1) if image_masks is not None else None  # [G*B, N]

        with autocast_context(self.device, self.amp_dtype):
            with torch.no_grad():
                t_tokens = self._teacher_encode(global_images)
                t_patch_mean = t_masked = None
                if flat_masks is None:
                    t_cls = self._teacher_head(t_tokens[:, 0])
                else:
                    head = self.teacher.head
                    features = head.bottleneck(t_tokens.flatten(0, 1)).view(*t_tokens.shape[:2], -1)
                    t_cls = head.last_layer(features[:, 0])
                    patch_features = features[:, prefix:]
                    # Targets are needed at masked positions only. The centre follows the mean logit of all
                    # patches, and the prototype layer is linear: mean of logits = logits of the mean.
                    t_masked = head.last_layer(patch_features[flat_masks])
                    t_patch_mean = head.last_layer(patch_features.float().mean(dim=(0, 1)))

            # Student: global views (masked for iBOT) then local views, one pass per resolution.
            s_global = self._student_encode(global_images, image_masks)
            cls_tokens = [s_global[:, 0]]
            cls_tokens += [self._student_encode(group)[:, 0] for group in _resolution_groups(views[n_global:])]
            head_in = torch.cat(cls_tokens)
            n_cls = head_in.shape[0]
            if flat_masks is not None:
                # Only masked positions carry a patch loss, so only they go through the (large) head.
                head_in = torch.cat([head_in, s_global[:, prefix:][flat_masks]])
            s_out = self._student_head(head_in)

        targets = teacher_probs(t_cls, self.center_cls, schedule.teacher_temp).view(n_global, batch, -1)
        student_cls = s_out[:n_cls].view(len(views), batch, -1)
        loss_cls = dino_cls_loss(student_cls, targets, cfg.student_temp)
        loss_patch = torch.zeros((), device=self.device)
        if masks is not None and t_masked is not None:
            patch_targets = teacher_probs(t_masked, self.center_patch, schedule.patch_teacher_temp)
            weights = masked_token_weights(masks.flatten(2))
            loss_patch = ibot_patch_loss(s_out[n_cls:], patch_targets, weights, cfg.student_temp)
        loss = cfg.lambda_cls * loss_cls + (cfg.lambda_patch * loss_patch if self.ibot else 0.0)
        return _StepOutput(loss, loss_cls.detach(), loss_patch.detach(), t_cls, t_patch_mean)

    def _optimise(self, loss: torch.Tensor, schedule: StepSchedule) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.dist is not None:  # DDP's gradient averaging, before unscaling and clipping
            self.dist.mean_all_([p.grad for p in self._trainable if p.grad is not None])
        if self.cfg.clip_grad > 0:
            clip_gradients_(self._trainable, self.cfg.clip_grad)
        if schedule.freeze_last_layer:
            for param in self._last_layer:
                param.grad = None
        decay_group, no_decay_group = self.optimizer.param_groups
        for group in (decay_group, no_decay_group):
            group["lr"] = schedule.lr
        decay_group["weight_decay"] = schedule.weight_decay
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        ema_update_(self._teacher_params, self._student_params, schedule.teacher_momentum)


def _resolution_groups(views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Concatenate consecutive views of equal size so each resolution is one batched forward pass."""
    groups: list[list[torch.Tensor]] = []
    for view in views:
        if groups and groups[-1][0].shape == view.shape:
            groups[-1].append(view)
        else:
            groups.append([view])
    return [torch.cat(g) if len(g) > 1 else g[0] for g in groups]


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)


def _strip(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _preview(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], prefix: str) -> None:
    """load_state_dict(strict=True), with a CheckpointError naming missing, unexpected or misshapen keys."""
    own = module.state_dict()
    missing = sorted(prefix + k for k in own if k not in state)
    unexpected = sorted(prefix + k for k in state if k not in own)
    misshapen = sorted(prefix + k for k, v in state.items()
                       if k in own and tuple(v.shape) != tuple(own[k].shape))
    problems = []
    if missing:
        problems.append(f"missing {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected {_preview(unexpected)}")
    if misshapen:
        problems.append(f"wrong shape {_preview(misshapen)}")
    if problems:
        raise CheckpointError("<state>", "; ".join(problems))
    module.load_state_dict(dict(state), strict=True)
