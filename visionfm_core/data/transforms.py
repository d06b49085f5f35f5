"""Image transforms: DINO multi-crop with per-modality augmentations, and the deterministic eval resize.

Input is always (H, W, 3) uint8 from the readers; output is normalised float32 (3, h, w) with the
modality's own mean/std. Geometry (crop, resize, flips) runs per image on uint8 tensors; colour
jitter, grayscale, blur, solarisation and normalisation run batched per view (`Photometric`), because
torchvision's per-image path spends most of its time in per-call overhead on small crops (measured:
3-5 ms per 28 px image for six views, more than the SSL step itself on a tiny ViT).

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms import InterpolationMode, RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as TF

from visionfm_core.data.photometric import Photometric
from visionfm_core.data.preprocess import fast_fundus_fov, mask_box
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
    # Read-only arrays (a memory-mapped .npz, a cached image) are copied: torch cannot wrap them safely.
    array = np.ascontiguousarray(image) if image.flags.writeable else np.array(image, order="C")
    return torch.from_numpy(array).permute(2, 0, 1)


def _normalise(modality: Modality) -> v2.Transform:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(modality.mean, modality.std)])


class Geometry:
    """Per image: a random resized crop (bicubic, antialiased) and the flips the modality allows, on a
    (3, H, W) uint8 tensor. torchvision's functional kernels are called directly: the v2 transform
    objects cost more in per-call overhead than the resize itself on small crops."""

    def __init__(self, policy: AugmentationPolicy, size: int, scale: tuple[float, float]) -> None:
        self.size = size
        self.scale = scale
        self.ratio = policy.aspect_ratio
        self.horizontal_flip = policy.horizontal_flip
        self.vertical_flip = policy.vertical_flip

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        top, left, height, width = RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        crop = TF.resized_crop(image, top, left, height, width, [self.size, self.size],
                               interpolation=InterpolationMode.BICUBIC, antialias=True)
        if self.horizontal_flip and float(torch.rand(())) < 0.5:
            crop = crop.flip(-1)
        if self.vertical_flip and float(torch.rand(())) < 0.5:
            crop = crop.flip(-2)
        return crop


class ScaledGeometry:
    """Per image: a crop of ``size`` pixels at a given working scale (source pixels per view pixel fixed
    by the caller), zoomed by up to ``zoom`` either way, with the modality's aspect jitter and flips.
    Parts of the crop outside the image are black (the normalised background outside the fundus)."""

    def __init__(self, policy: AugmentationPolicy, size: int, zoom: float) -> None:
        self.size = size
        self.log_zoom = float(np.log(zoom))
        self.log_ratio = (float(np.log(policy.aspect_ratio[0])), float(np.log(policy.aspect_ratio[1])))
        self.horizontal_flip = policy.horizontal_flip
        self.vertical_flip = policy.vertical_flip

    def side(self, scale: float) -> float:
        """The source side of an unzoomed view at working scale ``scale`` (working px per source px)."""
        return self.size / scale

    def __call__(self, image: torch.Tensor, scale: float, centre: tuple[float, float]) -> torch.Tensor:
        draws = torch.rand(4).tolist()
        zoom = float(np.exp((2 * draws[0] - 1) * self.log_zoom))
        ratio = float(np.exp(self.log_ratio[0] + draws[1] * (self.log_ratio[1] - self.log_ratio[0])))
        side = self.side(scale) / zoom
        width, height = max(1, round(side * ratio**0.5)), max(1, round(side / ratio**0.5))
        top, left = round(centre[0] - height / 2), round(centre[1] - width / 2)
        crop = TF.resized_crop(image, top, left, height, width, [self.size, self.size],
                               interpolation=InterpolationMode.BICUBIC, antialias=True)
        if self.horizontal_flip and draws[2] < 0.5:
            crop = crop.flip(-1)
        if self.vertical_flip and draws[3] < 0.5:
            crop = crop.flip(-2)
        return crop


_WORKING_MEMO: dict[tuple[int, int], tuple[np.ndarray, torch.Tensor, torch.Tensor]] = {}
_WORKING_MEMO_SIZE = 64


def working_fov(image: np.ndarray, fov_diameter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, h, w) uint8 field-of-view box of a fundus photograph resampled so that the field of view is
    `fov_diameter` pixels wide, black outside the field of view, and its (h, w) bool mask. A read-only
    image (a decoded photograph a loader caches) is remembered: its views are drawn round after round."""
    key = (id(image), fov_diameter)
    hit = _WORKING_MEMO.get(key)
    if hit is not None and hit[0] is image:
        return hit[1], hit[2]
    fov = fast_fundus_fov(image)
    top, bottom, left, right = mask_box(fov)
    source = _to_chw_uint8(image)[:, top:bottom, left:right]
    inside = torch.from_numpy(np.ascontiguousarray(fov[top:bottom, left:right]))
    scale = fov_diameter / max(1, right - left)
    size = [max(1, round((bottom - top) * scale)), max(1, round((right - left) * scale))]
    if size != list(source.shape[-2:]):
        source = TF.resize(source, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
        inside = TF.resize(inside[None], size, interpolation=InterpolationMode.NEAREST)[0]
    source = source * inside
    if not image.flags.writeable:
        if len(_WORKING_MEMO) >= _WORKING_MEMO_SIZE:
            _WORKING_MEMO.pop(next(iter(_WORKING_MEMO)))
        _WORKING_MEMO[key] = (image, source, inside)
    return source, inside


class MultiCrop:
    """(H, W, 3) uint8 -> [global crops..., local crops...] as normalised float tensors.

    Two stages, so a DataLoader can batch the expensive one: `crop` (per image: geometry, uint8) and
    `finish` (per batch of one view: colour, blur, solarisation, normalisation; see `Photometric`).
    Calling the object runs both on one image. `BatchedMultiCrop` is the collate function that runs
    `finish` once per view over a whole batch, which is what the training loaders use.
    """

    def __init__(self, global_geometry: list[Geometry], local_geometry: Geometry, local_crops: int,
                 global_photometric: list[Photometric], local_photometric: Photometric,
                 fov_crop: bool = False, scaled: tuple[list[ScaledGeometry], ScaledGeometry] | None = None,
                 fov_diameter: int = 0) -> None:
        self.fov_crop = fov_crop
        # Views at the dense tasks' working scale (fundus, `fov_diameter` > 0) instead of resized crops.
        self.scaled = scaled if fov_crop and fov_diameter > 0 else None
        self.fov_diameter = fov_diameter
        self.global_geometry = global_geometry
        self.local_geometry = local_geometry
        self.local_crops = local_crops
        self.global_photometric = global_photometric
        self.local_photometric = local_photometric

    @property
    def photometric(self) -> list[Photometric]:
        """The photometric stage of every view, in view order."""
        return [*self.global_photometric, *[self.local_photometric] * self.local_crops]

    def crop(self, image: np.ndarray) -> list[torch.Tensor]:
        """The geometric views of one image, uint8 (3, h, w); with ``fov_crop`` (fundus) they are
        drawn from the field of view's box, black outside the field of view (no crop of the border)."""
        if self.scaled is not None:
            return self._scaled_views(*working_fov(image, self.fov_diameter))
        source = _to_chw_uint8(image)
        if self.fov_crop:
            fov = fast_fundus_fov(image)
            top, bottom, left, right = mask_box(fov)
            inside = torch.from_numpy(np.ascontiguousarray(fov[top:bottom, left:right]))
            source = source[:, top:bottom, left:right] * inside
        views = [view(source) for view in self.global_geometry]
        return views + [self.local_geometry(source) for _ in range(self.local_crops)]

    def _scaled_views(self, source: torch.Tensor, inside: torch.Tensor) -> list[torch.Tensor]:
        """Every view of the field of view's box at the working scale (`source`, black outside the field of
        view, `inside` its mask), centred near one anchor inside the field of view (so the views show
        overlapping parts of one region, as DINO's crops of a small image do)."""
        assert self.scaled is not None
        global_views, local_view = self.scaled
        scale = 1.0
        height, width = inside.shape
        anchor = (height / 2, width / 2)
        for _ in range(16):  # a random point of the field of view (the box's corners are black)
            y, x = (float(v) for v in torch.rand(2))
            if bool(inside[int(y * (height - 1)), int(x * (width - 1))]):
                anchor = (y * (height - 1), x * (width - 1))
                break
        spread = global_views[0].side(scale) / 2

        def near() -> tuple[float, float]:
            # A centre near the anchor that is itself inside the field of view (a few tries, else the anchor).
            for _ in range(8):
                dy, dx = ((2 * float(v) - 1) * spread for v in torch.rand(2))
                y = min(max(anchor[0] + dy, 0.0), height - 1.0)
                x = min(max(anchor[1] + dx, 0.0), width - 1.0)
                if bool(inside[int(y), int(x)]):
                    return y, x
            return anchor

        views = [view(source, scale, near()) for view in global_views]
        return views + [local_view(source, scale, near()) for _ in range(self.local_crops)]

    def finish(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-view batches [B, 3, h, w] uint8 -> normalised float32, each view with its own photometrics."""
        if len(views) != len(self.photometric):
            raise DataError("<batch>", f"{len(views)} views, the multi-crop makes {len(self.photometric)}")
        return [stage(view) for stage, view in zip(self.photometric, views, strict=True)]

    def __call__(self, image: np.ndarray) -> list[torch.Tensor]:
        return [view[0] for view in self.finish([v.unsqueeze(0) for v in self.crop(image)])]


def multicrop_transform(modality: Modality, cfg: SSLConfig, image_size: int,
                        patch_size: int = 16) -> MultiCrop:
    """(H, W, 3) uint8 -> [global crops..., local crops...] normalised float tensors (a `MultiCrop`).

    Crop sizes come from `cfg` (global defaults to `image_size`, local to about 3/7 of it rounded to a
    multiple of `patch_size`). With `cfg.fov_diameter` > 0, fundus views are cut at that working scale
    (the pixels the dense tasks' tiles see) rather than resized from the whole field of view.
    """
    policy = augmentation_policy(modality)
    global_size, local_size = resolve_crop_sizes(cfg, image_size, patch_size)
    blur_first, blur_second, blur_local = policy.blur_prob

    def photometric(size: int, blur_prob: float, solarize_prob: float) -> Photometric:
        low, high = (s * size / 224 for s in _BLUR_SIGMA_AT_224)
        return Photometric(
            brightness=policy.brightness, contrast=policy.contrast, saturation=policy.saturation, hue=policy.hue,
            jitter_prob=policy.jitter_prob, grayscale_prob=policy.grayscale_prob, blur_prob=blur_prob,
            blur_sigma=(max(low, 0.05), max(high, 0.1)), solarize_prob=solarize_prob,
            mean=tuple(modality.mean), std=tuple(modality.std),
        )

    return MultiCrop(
        [Geometry(policy, global_size, cfg.global_crop_scale) for _ in range(cfg.global_crops)],
        Geometry(policy, local_size, cfg.local_crop_scale),
        cfg.local_crops,
        [photometric(global_size, blur_first if i == 0 else blur_second, 0.0 if i == 0 else policy.solarize_prob)
         for i in range(cfg.global_crops)],
        photometric(local_size, blur_local, 0.0),
        fov_crop=modality.name == "fundus",
        scaled=([ScaledGeometry(policy, global_size, cfg.view_zoom) for _ in range(cfg.global_crops)],
                ScaledGeometry(policy, local_size, cfg.view_zoom)),
        fov_diameter=cfg.fov_diameter,
    )


def eval_transform(modality: Modality, image_size: int) -> Callable[[np.ndarray], torch.Tensor]:
    """Deterministic resize to image_size x image_size (bicubic, antialiased) and normalisation."""
    pipeline = v2.Compose([
        v2.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC, antialias=True),
        _normalise(modality),
    ])

    def transform(image: np.ndarray) -> torch.Tensor:
        return pipeline(_to_chw_uint8(image))  # type: ignore[no-any-return]

    return transform


class BatchedMultiCrop:
    """Collate function for datasets that return `MultiCrop.crop` views: stacks each view over the batch
    and runs the photometric stage once per view on the whole batch (per-image draws, batched maths),
    in the DataLoader's worker when it has workers."""

    def __init__(self, multicrop: MultiCrop) -> None:
        self.multicrop = multicrop

    def __call__(self, batch: Sequence[tuple[Sequence[torch.Tensor], int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
        views, labels = collate_multicrop(batch)
        return self.multicrop.finish(views), labels


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
