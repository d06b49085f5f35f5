"""Semantic segmentation (binary or multi-class masks) with a UNETR-style head.

Loss: cross-entropy plus soft Dice over the foreground classes, both blind to ignored pixels
(outside the labelled field of view, outside the image, unknown mask colours). With tiled
preprocessing (the default for segmentation) the trainer scores and predicts whole photographs at
their own resolution (:mod:`visionfm_core.tasks.tiles`): :class:`SourceSegmentationMeter` counts
source pixels, and a binary task's probability threshold is the one that maximises validation Dice
(``best_threshold``), stored with the model. Without tiles, metrics are at the network's input
resolution. Dice and IoU are summed over the whole split per class ("global"), ``dice_per_image``
averages the foreground Dice of each image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from visionfm_core.errors import ConfigError, DataError
from visionfm_core.evaluation.task_metrics import (
    IGNORE_INDEX,
    OverlapCounts,
    dice_per_class,
    foreground_dice,
    foreground_iou,
    mean_defined,
    overlap_counts,
)
from visionfm_core.models.heads import FoldedUNETRHead, HeadOutput, LightUNETRHead, TaskHead, UNETRHead
from visionfm_core.tasks.adapters.base import Meter, Regime, TaskAdapter
from visionfm_core.tasks.adapters.thin_structures import soft_cldice
from visionfm_core.tasks.data import Batch
from visionfm_core.tasks.geometry import Window, logits_to_source, resample_label_fractions, resample_labels
from visionfm_core.tasks.samples import MaskEncoding, TaskSample, load_target_mask

LABEL_CACHE_BYTES = 256 * 2**20
# Each decoder's default width: light/unetr count full-resolution channels, folded half-resolution ones.
DECODER_FEATURES = {"light": 8, "unetr": 8, "folded": 32, "folded-reduce": 32, "folded-lean": 32}
# The folded decoders' half-resolution fusion (FoldedUNETRHead's ``fuse``).
FOLDED_FUSE = {"folded": "conv", "folded-reduce": "reduce", "folded-lean": "lean"}


class DecodedLabels:
    """Class maps decoded from mask files, kept while they fit ``budget`` bytes. Tiled training cuts
    several crops of every photograph each epoch; decoding its mask and field-of-view mask for each
    crop cost about a quarter of a CPU training step. Masks given as arrays are not kept (no name)."""

    def __init__(self, budget: int = LABEL_CACHE_BYTES) -> None:
        self.budget = budget
        self.used = 0
        self._maps: dict[tuple[str, str | None, tuple[int, int]], np.ndarray] = {}

    def get(self, sample: TaskSample, encoding: MaskEncoding, num_classes: int, shape: tuple[int, int]) -> np.ndarray:
        if not isinstance(sample.mask, str) or not (sample.fov is None or isinstance(sample.fov, str)):
            return load_target_mask(sample, encoding, num_classes, shape)
        key = (sample.mask, sample.fov, shape)
        labels = self._maps.get(key)
        if labels is None:
            labels = load_target_mask(sample, encoding, num_classes, shape)
            if self.used + labels.nbytes <= self.budget:
                labels.flags.writeable = False  # shared by every crop: nobody may change it
                self._maps[key] = labels
                self.used += labels.nbytes
        return labels


@dataclass
class SegmentationTask(TaskAdapter):
    """``num_classes`` includes background (class 0): a binary mask task has 2."""

    num_classes: int = 2
    class_names: tuple[str, ...] = ()
    encoding: MaskEncoding = field(default_factory=MaskEncoding)
    # Decoder width; None: the decoder's own default (DECODER_FEATURES).
    features: int | None = None
    dice_weight: float = 1.0
    # Weight of the soft centreline Dice term (thin_structures.soft_cldice); 0 turns it off. Not on by
    # default: at 0.5 it gave HRF held-out Dice 0.782 against 0.784 without, for 27% more training CPU.
    skeleton_weight: float = 0.0
    threshold: float = 0.5
    # Train on each class's share of every input pixel (resample_label_fractions) rather than on the
    # class that wins its area vote: a vessel narrower than an input pixel stays in the target. At the
    # working scale (HRF: 0.63x of 1752 px) the vote alone caps validation Dice at 0.929 for a perfect
    # model, the shares at 0.976. HRF, 4000 steps of 2 (Intel Xeon, 1 thread): validation Dice 0.8147
    # (flip-averaged, at the chosen threshold), held-out 0.7972, against 0.8140 and 0.7961 with the vote.
    soft_targets: bool = True
    # "folded" (FoldedUNETRHead): no full-resolution convolution, so 0.9x the light decoder's training
    # step and 0.8x its prediction on this CPU at the same HRF Dice (0.7886 vs 0.7887 after 800 steps);
    # the saving pays for the mini ViT (default_arch). "folded-reduce" (the default since session 15):
    # the same decoder with a 1x1 projection (76 -> 32 channels) before the half-resolution fusion's
    # 3x3s, whose first one was 17% of a training step: 0.91x the training step's CPU and 0.91x the
    # prediction's (Intel Xeon, 1 thread, paired, without the tiles), spent on steps (default_tiles).
    # "folded-lean" (the projection and one 3x3) was 0.81x but lost: 5568 steps gave HRF validation Dice
    # 0.8149, held-out 0.7983. Saved models keep the decoder they were trained with.
    decoder: str = "folded-reduce"
    labels: DecodedLabels = field(default_factory=DecodedLabels, init=False, repr=False, compare=False)

    kind = "segmentation"
    selection_metric = "dice"
    higher_is_better = True
    max_batch_size = 8
    # Measured on 16 HRF photographs (held-out Dice): 0.742 after 300 steps, 0.772 after 600 (lr 1e-3);
    # at lr 2e-3 0.784 after 600 and 0.789 after 800 (light decoder, micro ViT); folded decoder: 0.789
    # after 800, 0.792 after 1000 (micro). Folded decoder + mini ViT + 4 tiles a step (default_steps:
    # 1600 steps of 4 = 800 of 8): 0.7925, for 1.09x the training CPU of the light/micro 800 x 8 run.
    # Federated fine-tuning's floor (steps of up to max_batch_size tiles); `visionfm finetune` counts
    # tiles (default_tiles).
    default_min_steps = 800
    # A decoder and (usually) an encoder learnt from nothing in a few hundred steps: twice the
    # classification rate. HRF held-out Dice after 600 steps from scratch: 0.784 at 2e-3 without layer
    # decay, 0.777 at 1e-3 with decay 0.65 (the validation Dice rose faster from the first validation on).
    default_lr = 2e-3
    # Validate and save the moving average of the weights over about the last 100 steps. HRF (800 steps,
    # lr 2e-3): held-out Dice 0.7887 against 0.7888 without, but validation Dice rose at every check up to
    # the last step (without: up and down by a few thousandths from step 560), so the selection is steadier.
    default_ema_decay = 0.99
    # Each validation predicts the validation photographs whole (HRF: 4 photographs, 5.5 CPU-s on the Xeon at
    # 1 thread, as long as 33 training steps). With the weight average the validation Dice rises to the end
    # of the run: in every HRF run of sessions 12-13 the last or the one before it was selected (by
    # at most 0.0009), so 6 validations choose as well as 12 and give their time to training steps.
    default_max_validations = 6
    # From scratch, the "mini" ViT (dim 128, depth 4) rather than micro (64, 2): the encoder is a small
    # part of a step (the decoder's convolutions dominate): its step costs 1.14-1.22x
    # micro's (bench/bench_seg_step.py). HRF (800 steps of 8 tiles, lr 2e-3, the weight average):
    # held-out Dice 0.7909 against 0.7887. Patch 8 with micro gave 0.7894; mini at lr 3e-3 fell behind.
    default_arch = "mini"
    # `visionfm finetune` trains on 2 tiles a step for four times the steps rather than 8 a step: the same
    # tiles and no more CPU, four times the updates. HRF (mini ViT, light decoder): 4 tiles a step gave
    # held-out Dice 0.7920 against 0.7909 at 8. Folded decoder (Intel Xeon, 1 thread, the CLI): 3200 steps
    # of 2 gave 0.7944 at 775 training CPU-s against 1600 of 4 0.7917 at 776; 6400 of 1 (a harness of the
    # same code) 0.7944 at 856 (its validation 0.8120 flip-averaged against 0.8116: not worth 16% more
    # CPU). Federated fine-tuning keeps its own batch (capped at max_batch_size) and default_min_steps.
    default_batch_size = 2
    # Tiles a `visionfm finetune` run sees (default_steps): 4992 steps of 2. The CLI (Intel Xeon, 1 thread):
    # 3200 steps of 2 gave validation Dice 0.8116 (flip-averaged, at the chosen threshold), held-out
    # 0.7944 (775 training CPU-s); 4000 0.8140 and 0.7961 (871 CPU-s), both with the area vote. With soft
    # targets and lr 1e-3: 4000 steps 0.8164 and 0.7986 (a harness of the same code), 4800 0.8177 and
    # 0.7997 (940 CPU-s). An AMD EPYC needs about 1.5x this Xeon's wall time at 2 threads (2000 steps of 4
    # took it 14 min 17 s), so 4800 steps would overrun the 15-minute budget there, and 4000 was the
    # default until session 14 made the step cheaper (176 -> 163 CPU-ms with its tiles, paired on the
    # Xeon) and validated 6 times instead of 11: 4672 steps of the "folded" decoder (validation 0.8175,
    # held-out 0.7999, 862 CPU-s). Session 15's "folded-reduce" decoder costs 0.94x a step with its tiles
    # and 0.93x a validation (paired), so 4992 steps (78 epochs of HRF's 16 photographs) take the CPU of
    # those 4672 (814 against 815 CPU-s of steps and validations by the paired costs):
    # validation 0.8178, held-out 0.8005 (841 CPU-s at a 1-minute load of about 3); with --seed 1 (another
    # validation split), back to back: 0.8253 and 0.7999 against 4672 steps of "folded" 0.8251 and 0.7996.
    default_tiles = 9984

    def default_steps(self, batch_size: int) -> int:
        """Enough steps of ``batch_size`` tiles to see ``default_tiles`` tiles (4992 steps of 2, 1248 of
        8), and never fewer than ``default_min_steps`` (which federated fine-tuning uses, in full batches)."""
        return max(self.default_min_steps, math.ceil(self.default_tiles / max(1, batch_size)))

    def default_lr_for(self, batch_size: int) -> float:
        """``default_lr`` (tuned at full batches of ``max_batch_size``) times the square root of the batch's
        share of a full one: a smaller batch's noisier gradient takes smaller steps, 1e-3 at 2 tiles. HRF,
        4000 steps of 2 with soft targets (Intel Xeon, 1 thread): validation Dice 0.8164 (flip-averaged, at
        the chosen threshold), held-out 0.7986 at 1e-3; 0.8157 and 0.7983 at 1.4e-3; 0.8147 and 0.7972 at 2e-3."""
        full = self.max_batch_size or batch_size
        return self.default_lr * math.sqrt(min(full, max(1, batch_size)) / full)

    def default_layer_decay(self, pretrained: bool) -> float:
        """0.65 for a pretrained encoder; none (1.0) for a fresh one, whose patch embedding and first
        block have nothing to protect: with 0.65 a 2-block encoder's patch embedding would learn at 0.27x
        the head's rate."""
        return 0.65 if pretrained else 1.0

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ConfigError("num_classes", "segmentation needs background plus at least one class")
        if self.decoder not in DECODER_FEATURES:
            raise ConfigError("decoder", f"unknown decoder {self.decoder!r}; use {', '.join(DECODER_FEATURES)}")
        if self.features is None:
            self.features = DECODER_FEATURES[self.decoder]
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ConfigError("class_names", f"{len(self.class_names)} names for {self.num_classes} classes")
        self.class_names = tuple(self.class_names) or (
            "background",
            *(f"class{i}" for i in range(1, self.num_classes)),
        )

    def to_config(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "encoding": self.encoding.to_dict(),
            "features": self.features,
            "dice_weight": self.dice_weight,
            "skeleton_weight": self.skeleton_weight,
            "threshold": self.threshold,
            "soft_targets": self.soft_targets,
            "decoder": self.decoder,
        }

    @classmethod
    def from_config(cls, raw: dict[str, Any]) -> SegmentationTask:
        values = dict(raw)
        values["encoding"] = MaskEncoding.from_dict(values.get("encoding", {}))
        values["class_names"] = tuple(values.get("class_names", ()))
        values.setdefault("soft_targets", False)  # saved before soft targets: trained on the vote
        return cls(**values)

    def build_head(self, embed_dim: int, depth: int, patch_size: int, regime: Regime) -> TaskHead:
        assert self.features is not None  # set in __post_init__
        if self.decoder in FOLDED_FUSE:
            return FoldedUNETRHead(embed_dim, depth, self.num_classes, features=self.features,
                                   fuse=FOLDED_FUSE[self.decoder])
        if self.decoder == "light":
            return LightUNETRHead(embed_dim, depth, self.num_classes, features=self.features)
        return UNETRHead(embed_dim, depth, self.num_classes, features=self.features, patch_size=patch_size)

    def preprocess_defaults(self) -> dict[str, Any]:
        # Whole photographs at a common scale (field of view 1024 px wide, so cameras of 0.3 to 15
        # megapixels show vessels at similar widths), each channel standardised against its
        # neighbourhood inside the field of view (camera colour, exposure, gamma and uneven lighting
        # cancel), trained on crops with the augmentations for what remains between cameras: scale,
        # orientation, exposure, gamma, colour balance and sharpness (a low-resolution camera's
        # photograph brought up to the working scale is soft). A saved model predicts every tile and
        # its three mirror images and averages them (vessels have no preferred side): 4x the
        # prediction arithmetic, a few seconds a photograph, for steadier thin vessels.
        # A field of view 1400 px across gave HRF held-out Dice 0.790 against 0.789 (800 steps, with the
        # weight average) for twice the prediction arithmetic: not worth it.
        return {
            "test_flips": True,
            "contrast": "local",
            "blur": 1.0,
            "tiles": True,
            "fov_diameter": 1024,
            "crops_per_image": 8,
            "overlap": 0.5,
            "max_zoom": 1.25,
            "rotate": 20.0,
            "jitter": 0.2,
            "gamma": 0.3,
            "colour": 0.1,
        }

    def check(self, samples: Sequence[TaskSample]) -> None:
        for sample in samples:
            if sample.mask is None:
                raise DataError(sample.source, "segmentation needs a mask for every image, this one has none")

    def prepare(self, sample: TaskSample, window: Window, source_size: tuple[int, int]) -> dict[str, Any]:
        labels = self.labels.get(sample, self.encoding, self.num_classes, source_size)
        if self.soft_targets:
            mask, fractions = resample_label_fractions(labels, window, self.num_classes)
            return {"mask": mask, "mask_fractions": fractions}
        return {"mask": resample_labels(labels, window, self.num_classes)}

    def loss(self, outputs: HeadOutput, batch: Batch) -> Tensor:
        """Cross-entropy + ``dice_weight`` x (1 - soft Dice) [+ ``skeleton_weight`` x (1 - clDice)],
        over the pixels that are not ignored; against ``mask_fractions`` where the batch has them
        (soft targets), else against the class map ``mask``."""
        assert isinstance(outputs, Tensor)
        logits, target = outputs.float(), batch["mask"].long()
        valid = (target != IGNORE_INDEX).unsqueeze(1).float()
        fractions = batch.get("mask_fractions")
        if fractions is not None:
            one_hot = fractions.float() * valid
            pixels = (-(one_hot * torch.log_softmax(logits, dim=1)).sum(1)).sum()
            cross_entropy = pixels / valid.sum().clamp_min(1.0)
        else:
            cross_entropy = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
            if bool(torch.isnan(cross_entropy)):  # every pixel ignored in this batch
                cross_entropy = logits.sum() * 0.0
        if self.dice_weight == 0 and self.skeleton_weight == 0:
            return cross_entropy
        if fractions is None:
            one_hot = F.one_hot(target.clamp(0, self.num_classes - 1), self.num_classes).permute(0, 3, 1, 2).float()
            one_hot = one_hot * valid
        probs = torch.softmax(logits, dim=1) * valid
        dims = (0, 2, 3)
        intersection = (probs * one_hot).sum(dims)[1:]
        denominator = probs.sum(dims)[1:] + one_hot.sum(dims)[1:]
        soft_dice = (2 * intersection + 1.0) / (denominator + 1.0)
        loss = cross_entropy + self.dice_weight * (1.0 - soft_dice.mean())
        if self.skeleton_weight:
            centreline = soft_cldice(probs[:, 1:], one_hot[:, 1:])
            loss = loss + self.skeleton_weight * (1.0 - centreline.mean())
        return loss

    def meter(self) -> Meter:
        return SegmentationMeter(self)

    def predictions(self, outputs: HeadOutput, batch: Batch) -> list[dict[str, Any]]:
        """Letterboxed (untiled) inputs: logits brought back to each image's own pixels."""
        assert isinstance(outputs, Tensor)
        results: list[dict[str, Any]] = []
        for logits, window_values, size in zip(outputs, batch["window"], batch["source_size"], strict=True):
            height, width = (int(v) for v in size.tolist())
            source_logits = logits_to_source(logits.float(), Window.from_tensor(window_values), height, width)
            results.append(self.source_prediction(torch.softmax(source_logits, dim=0)))
        return results

    # --- whole photographs at their own resolution (tiled preprocessing) ------------------------------

    def source_meter(self) -> SourceSegmentationMeter:
        return SourceSegmentationMeter(self)

    def source_labels(self, sample: TaskSample, shape: tuple[int, int]) -> np.ndarray:
        """The sample's class map at the source resolution (ignored outside its labelled FOV)."""
        return load_target_mask(sample, self.encoding, self.num_classes, shape)

    def decide(self, probabilities: Tensor) -> np.ndarray:
        """(C, H, W) class probabilities -> (H, W) uint8 class map; a binary task uses its threshold."""
        if self.num_classes == 2:
            return (probabilities[1] >= self.threshold).to(torch.uint8).cpu().numpy()
        # max().indices: argmax over the leading (channel) dim is ten times slower on the CPU.
        return probabilities.max(0).indices.to(torch.uint8).cpu().numpy()

    def source_prediction(self, probabilities: Tensor) -> dict[str, Any]:
        mask = self.decide(probabilities)
        fractions = np.bincount(mask.ravel(), minlength=self.num_classes) / mask.size
        return {
            "mask": mask,
            "area_fraction": {name: round(float(f), 6) for name, f in zip(self.class_names, fractions, strict=True)},
        }

class SegmentationMeter(Meter):
    def __init__(self, task: SegmentationTask) -> None:
        self.task = task
        self.counts = OverlapCounts.zeros(task.num_classes)
        self.per_image: list[float] = []

    def update(self, outputs: HeadOutput, batch: Batch) -> None:
        assert isinstance(outputs, Tensor)
        predicted = outputs.max(1).indices.cpu().numpy()
        target = batch["mask"].cpu().numpy()
        for pred, true in zip(predicted, target, strict=True):
            counts = overlap_counts(pred, true, self.task.num_classes)
            self.counts += counts
            self.per_image.append(foreground_dice(counts))

    def compute(self) -> dict[str, float]:
        return overlap_scores(self.task, self.counts, self.per_image)


THRESHOLD_BINS = 100


def overlap_scores(task: SegmentationTask, counts: OverlapCounts, per_image: list[float]) -> dict[str, float]:
    """Pooled Dice and IoU, the mean per-image Dice, the image count and each foreground class's Dice."""
    results = {
        "dice": foreground_dice(counts),
        "iou": foreground_iou(counts),
        "dice_per_image": mean_defined(per_image),
        "count": float(len(per_image)),
    }
    for name, value in zip(task.class_names[1:], dice_per_class(counts)[1:], strict=True):
        results[f"dice_{name}"] = value
    return results


class SourceSegmentationMeter:
    """Scores whole photographs at their own resolution. For a binary task it also keeps histograms
    of the foreground probability of vessel and background pixels, from which the Dice at every
    threshold follows: ``best_threshold`` is the one with the highest pooled Dice."""

    def __init__(self, task: SegmentationTask) -> None:
        self.task = task
        self.counts = OverlapCounts.zeros(task.num_classes)
        self.per_image: list[float] = []
        self.positive = np.zeros(THRESHOLD_BINS, dtype=np.int64)
        self.negative = np.zeros(THRESHOLD_BINS, dtype=np.int64)

    def update(self, probabilities: Tensor, labels: np.ndarray) -> None:
        predicted = self.task.decide(probabilities)
        counts = overlap_counts(predicted, labels, self.task.num_classes)
        self.counts += counts
        self.per_image.append(foreground_dice(counts))
        if self.task.num_classes == 2:
            valid = labels != IGNORE_INDEX
            scores = probabilities[1].cpu().numpy()[valid]
            bins = np.minimum((scores * THRESHOLD_BINS).astype(np.int64), THRESHOLD_BINS - 1)
            truth = labels[valid] == 1
            self.positive += np.bincount(bins[truth], minlength=THRESHOLD_BINS)
            self.negative += np.bincount(bins[~truth], minlength=THRESHOLD_BINS)

    def best_threshold(self) -> tuple[float, float]:
        """(threshold, pooled Dice there) over the bin edges; (0.5, nan) without positives."""
        total_positive = int(self.positive.sum())
        if total_positive == 0:
            return 0.5, float("nan")
        # Predicting foreground at scores >= edge k: true positives are the positives in bins >= k.
        true_pos = np.cumsum(self.positive[::-1])[::-1]
        false_pos = np.cumsum(self.negative[::-1])[::-1]
        dice = 2 * true_pos / (2 * true_pos + false_pos + (total_positive - true_pos))
        best = int(np.argmax(dice[1:])) + 1  # edge 0 would call every pixel foreground
        return best / THRESHOLD_BINS, float(dice[best])

    def compute(self) -> dict[str, float]:
        results = overlap_scores(self.task, self.counts, self.per_image)
        if self.task.num_classes == 2:
            threshold, dice = self.best_threshold()
            results["best_threshold"], results["dice_at_best_threshold"] = threshold, dice
        return results
