"""Image transforms: DINO multi-crop with per-modality augmentations, and the deterministic eval resize.

Input is always (H, W, 3) uint8 from the readers; output is normalised float32 (3, h, w) with the
modality's own mean/std. Augmentations run on uint8 tensors (torchvision v2) and are converted to
float once at the end, which is cheaper than augmenting floats.

Why the per-modality policies differ (see `AUGMENTATIONS`):
- Grayscale modalities (OCT, FFA, UBM, B-scan ultrasound, MRI) carry no colour: hue/saturation jitter
  and random grayscale would do nothing but cost time, so only brightness/contrast are jittered.
- Cross-sectional scans (OCT B-scans, UBM, B-scan ultrasound, MRI slices) and photographs with an
  up (slit lamp: upper vs lower lid, light beam; external eye) are never flipped vertically: the
  anatomy has a top. Horizontal flips are kept everywhere: they map a right eye to a left eye.
- Fundus and FFA are not flipped vertically either: the superior/inferior arcades and the disc-macula
  layout are asymmetric enough that a flipped image is not a plausible eye.
- Hue is never shifted on fundus: lesion colour (red haemorrhages vs yellow exudates) is diagnostic.
  Fundus keeps mild brightness/contrast/saturation jitter (camera and pigmentation differences) and a
  little random grayscale (red-free photographs exist clinically).
- Solarisation (one of DINO's asymmetric augmentations) is kept mild and only for photographs/FFA;
  on OCT and ultrasound the order of reflectivities is the signal, so it is off.
- Blur follows DINO (always on global view 1, rarely on view 2, half the local views), with the sigma
  scaled to the crop size so a 32 px crop is not blurred as hard as a 224 px one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms import InterpolationMode, v2

from visionfm_core.errors import DataError
from visionfm_core.modalities import Modality
from visionfm_core.ssl.config import SSLConfig, resolve_crop_sizes

# DINO's blur sigma range at 224 px (PIL radius 0.1-2.0), scaled for other crop sizes.
_BLUR_SIGMA_AT_224 = (0.1, 2.0)


@dataclass(frozen=True)
class AugmentationPolicy:
    """What may be changed about an image of a modality without making it implausible."""

    vertical_flip: bool = False
    horizontal_flip: bool = True
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.0
    hue: float = 0.0
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.0
    # Blur probability of global view 1, global view 2 (and any further), local views.
    blur_prob: tuple[float, float, float] = (1.0, 0.1, 0.5)
    solarize_prob: float = 0.0
    aspect_ratio: tuple[float, float] = (0.8, 1.25)


_GREY_SCAN = AugmentationPolicy(blur_prob=(0.5, 0.1, 0.3))
AUGMENTATIONS: dict[str, AugmentationPolicy] = {
    "fundus": AugmentationPolicy(saturation=0.1, grayscale_prob=0.05, solarize_prob=0.2),
    "oct": _GREY_SCAN,
    "ffa": AugmentationPolicy(brightness=0.3, contrast=0.3, solarize_prob=0.2),
    "slit_lamp": AugmentationPolicy(saturation=0.1, grayscale_prob=0.05, solarize_prob=0.1),
    "ubm": _GREY_SCAN,
    "ultrasound": _GREY_SCAN,
    "external_eye": AugmentationPolicy(saturation=0.2, hue=0.02, grayscale_prob=0.1, solarize_prob=0.1),
    "mri": _GREY_SCAN,
}


def augmentation_policy(modality: Modality) -> AugmentationPolicy:
    """The policy of a modality; grayscale modalities never get colour changes whatever the table says."""
    policy = AUGMENTATIONS.get(modality.name, AugmentationPolicy())
    if modality.grayscale:
        policy = AugmentationPolicy(
            vertical_flip=policy.vertical_flip, horizontal_flip=policy.horizontal_flip,
            brightness=policy.brightness, contrast=policy.contrast, jitter_prob=policy.jitter_prob,
            blur_prob=policy.blur_prob, solarize_prob=policy.solarize_prob, aspect_ratio=policy.aspect_ratio,
        )
    return policy


def _to_chw_uint8(image: np.ndarray) -> torch.Tensor:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError("<image>", f"transforms expect (H, W, 3) uint8, got {image.dtype} {image.shape}")
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def _normalise(modality: Modality) -> v2.Transform:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(modality.mean, modality.std)])


def _view_pipeline(policy: AugmentationPolicy, modality: Modality, size: int, scale: tuple[float, float],
                   blur_prob: float, solarize_prob: float) -> v2.Transform:
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(size, scale=scale, ratio=policy.aspect_ratio,
                             interpolation=InterpolationMode.BICUBIC, antialias=True),
    ]
    if policy.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    if policy.vertical_flip:
        steps.append(v2.RandomVerticalFlip())
    if policy.jitter_prob > 0 and (policy.brightness or policy.contrast or policy.saturation or policy.hue):
        jitter = v2.ColorJitter(brightness=policy.brightness, contrast=policy.contrast,
                                saturation=policy.saturation or None, hue=policy.hue or None)
        steps.append(v2.RandomApply([jitter], p=policy.jitter_prob))
    if policy.grayscale_prob > 0:
        steps.append(v2.RandomGrayscale(p=policy.grayscale_prob))
    if blur_prob > 0:
        low, high = (s * size / 224 for s in _BLUR_SIGMA_AT_224)
        kernel = 2 * math.ceil(3 * high) + 1
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(max(low, 0.05), max(high, 0.1)))],
                                    p=blur_prob))
    if solarize_prob > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=solarize_prob))
    steps.append(_normalise(modality))
    return v2.Compose(steps)


class MultiCrop:
    """Callable (H, W, 3) uint8 -> [global crops..., local crops...]; the view pipelines are inspectable."""

    def __init__(self, global_views: list[v2.Transform], local_view: v2.Transform, local_crops: int) -> None:
        self.global_views = global_views
        self.local_view = local_view
        self.local_crops = local_crops

    def __call__(self, image: np.ndarray) -> list[torch.Tensor]:
        source = _to_chw_uint8(image)
        views = [view(source) for view in self.global_views]
        return views + [self.local_view(source) for _ in range(self.local_crops)]


def multicrop_transform(modality: Modality, cfg: SSLConfig, image_size: int,
                        patch_size: int = 16) -> Callable[[np.ndarray], list[torch.Tensor]]:
    """(H, W, 3) uint8 -> [global crops..., local crops...] normalised float tensors (a `MultiCrop`).

    Crop sizes come from `cfg` (global defaults to `image_size`, local to about 3/7 of it rounded to a
    multiple of `patch_size`).
    """
    policy = augmentation_policy(modality)
    global_size, local_size = resolve_crop_sizes(cfg, image_size, patch_size)
    blur_first, blur_second, blur_local = policy.blur_prob
    global_views = [
        _view_pipeline(policy, modality, global_size, cfg.global_crop_scale,
                       blur_first if i == 0 else blur_second, 0.0 if i == 0 else policy.solarize_prob)
        for i in range(cfg.global_crops)
    ]
    local_view = _view_pipeline(policy, modality, local_size, cfg.local_crop_scale, blur_local, 0.0)
    return MultiCrop(global_views, local_view, cfg.local_crops)


def eval_transform(modality: Modality, image_size: int) -> Callable[[np.ndarray], torch.Tensor]:
    """Deterministic resize to image_size x image_size (bicubic, antialiased) and normalisation."""
    pipeline = v2.Compose([
        v2.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC, antialias=True),
        _normalise(modality),
    ])

    def transform(image: np.ndarray) -> torch.Tensor:
        return pipeline(_to_chw_uint8(image))  # type: ignore[no-any-return]

    return transform


def collate_multicrop(
    batch: Sequence[tuple[Sequence[torch.Tensor], int]],
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """[(views, label), ...] -> ([per-view [B, 3, h, w] tensors], labels [B] int64)."""
    if not batch:
        raise DataError("<batch>", "empty batch")
    n_views = len(batch[0][0])
    if any(len(views) != n_views for views, _ in batch):
        raise DataError("<batch>", "samples of one batch have different numbers of crops")
    stacked = [torch.stack([views[i] for views, _ in batch]) for i in range(n_views)]
    labels = torch.tensor([int(label) for _, label in batch], dtype=torch.int64)
    return stacked, labels
