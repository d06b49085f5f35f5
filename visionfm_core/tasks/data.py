"""Task datasets: load an image, choose its window, resample it and let the task adapter place its
targets in the same window. One dataset class serves every task.

An unreadable image or target never stops a run: in training the next readable sample takes its
place; in evaluation the sample is marked invalid and left out of the metrics (``skipped`` names
it, on the site only).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from visionfm_core.data.preprocess_contrast import LocalStatistics, local_statistics
from visionfm_core.errors import ConfigError, DataError
from visionfm_core.evaluation.task_metrics import IGNORE_INDEX
from visionfm_core.modalities import get_modality
from visionfm_core.tasks.camera import Camera, RawPhotograph, camera_tile, draw_camera
from visionfm_core.tasks.geometry import Window, letterbox, resample_image, resample_inside
from visionfm_core.tasks.samples import TaskSample
from visionfm_core.tasks.tiles import FieldOfView, working_scale

logger = logging.getLogger(__name__)

CONTRAST_MODES = ("none", "local")

Batch = dict[str, Any]
TargetPreparer = Callable[[TaskSample, Window, tuple[int, int]], dict[str, Any]]


@dataclass(frozen=True)
class Preprocess:
    """Input size, normalisation and training augmentation.

    ``fov_crop`` (fundus): every window is taken around the detected field of view, not the whole
    frame, and the image is black outside it. ``tiles`` (dense tasks): train on ``image_size`` crops
    at the working scale (the field of view ``fov_diameter`` pixels wide, 0 = each image's own
    resolution; ``crops_per_image`` per epoch) and predict with overlapping tiles (``overlap``); the
    letterbox of the whole image otherwise. Augmentation: zoom (``max_zoom``, both ways in tiles
    mode), mirror, rotation (degrees), brightness/contrast (``jitter``), gamma, per-channel colour
    and Gaussian blur (``blur``: the largest sigma in input pixels, on half the crops); ``jpeg``: the
    share of training tiles (tiles mode) cut from the raw photograph as another camera would deliver
    it, before the standardisation: pixels up to ``camera_coarseness`` times larger, then JPEG at a
    quality in ``jpeg_quality`` (:func:`~visionfm_core.tasks.camera.camera_tile`). ``contrast``
    "local" (fundus, with ``fov_crop``) standardises every channel against its neighbourhood inside
    the field of view (:func:`~visionfm_core.data.preprocess_contrast.local_contrast`), so that
    camera colour, exposure, gamma and illumination fall-off largely cancel before the network sees
    the image; other modalities (no ``fov_crop``) are left as they are. ``test_flips`` (tiled dense
    tasks): a saved model's evaluation and prediction average every tile's scores over its four
    mirror images (:func:`~visionfm_core.tasks.tiles.flip_averaged`); validation during training
    does not, except the final choice of the decision threshold.

    The input is ``image_size`` pixels wide and ``image_height`` high (0 = square): OCT B-scans keep
    their aspect ratio (see :func:`visionfm_core.tasks.aspect.input_shape`); tiles stay square.
    """

    image_size: int = 224
    image_height: int = 0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_zoom: float = 1.15
    flip: bool = True
    jitter: float = 0.1
    fov_crop: bool = False
    tiles: bool = False
    fov_diameter: int = 0
    crops_per_image: int = 8
    overlap: float = 0.5
    rotate: float = 0.0
    gamma: float = 0.0
    colour: float = 0.0
    blur: float = 0.0
    jpeg: float = 0.0
    jpeg_quality: tuple[int, int] = (40, 95)
    camera_coarseness: float = 1.0
    contrast: str = "none"
    test_flips: bool = False
    # Scales of the working resolution a saved tiled model predicts at (with ``test_flips``), averaged.
    test_scales: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if not self.test_scales or any(not 0.25 <= s <= 4.0 for s in self.test_scales):
            raise ConfigError("test_scales", f"need one or more scales in [0.25, 4], got {self.test_scales}")
        if self.contrast not in CONTRAST_MODES:
            raise ConfigError("contrast", f"unknown contrast {self.contrast!r}; use {' or '.join(CONTRAST_MODES)}")
        if self.blur < 0:
            raise ConfigError("blur", f"the blur sigma must be >= 0, got {self.blur}")
        if not 0.0 <= self.jpeg <= 1.0:
            raise ConfigError("jpeg", f"the share of JPEG tiles must lie in [0, 1], got {self.jpeg}")
        low, high = self.jpeg_quality
        if not 1 <= low <= high <= 100:
            raise ConfigError("jpeg_quality", f"need 1 <= low <= high <= 100, got {self.jpeg_quality}")
        # A JSON override (a federation's finetune-preprocess) gives a list: keep the dataclass hashable.
        object.__setattr__(self, "jpeg_quality", (int(low), int(high)))
        if self.camera_coarseness < 1.0:
            raise ConfigError("camera_coarseness", f"must be >= 1, got {self.camera_coarseness}")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError("overlap", f"tile overlap must lie in [0, 1), got {self.overlap}")
        if self.crops_per_image < 1 or self.fov_diameter < 0 or self.image_size < 1:
            raise ConfigError("preprocess", "image_size and crops_per_image must be positive, fov_diameter >= 0")
        if self.image_height < 0:
            raise ConfigError("image_height", f"must be >= 0 (0 = square), got {self.image_height}")

    @property
    def input_shape(self) -> tuple[int, int]:
        """(height, width) of a network input outside tiled training and prediction."""
        return (self.image_height or self.image_size, self.image_size)

    @classmethod
    def for_modality(cls, modality: str, image_size: int, **options: Any) -> Preprocess:
        mod = get_modality(modality)
        return cls(image_size=image_size, mean=mod.mean, std=mod.std, **options)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Preprocess:
        values = dict(raw)
        values["mean"], values["std"] = tuple(values["mean"]), tuple(values["std"])
        if "test_scales" in values:
            values["test_scales"] = tuple(float(s) for s in values["test_scales"])
        return cls(**values)

    def window(self, height: int, width: int, train: bool, fov: FieldOfView | None = None) -> Window:
        top, bottom, left, right = fov.box if fov is not None else (0, height, 0, width)
        if self.tiles and train:
            return self.tile_window(fov or FieldOfView(np.ones((height, width), bool), (0, height, 0, width)))
        base = letterbox(bottom - top, right - left, self.image_size, self.image_height or None)
        base = replace(base, x0=base.x0 + left, y0=base.y0 + top)
        if not train:
            return base
        return random_window_in(base, self.max_zoom, self.flip)

    def tile_window(self, fov: FieldOfView) -> Window:
        """A random training crop at the working scale (zoomed by up to ``max_zoom`` either way),
        centred on a random point of the field of view's box."""
        scale = working_scale(fov, self.fov_diameter)
        draws = torch.rand(5).tolist()
        zoom = math.exp((2 * draws[0] - 1) * math.log(max(1.0, self.max_zoom)))
        side = self.image_size / scale / zoom
        top, bottom, left, right = fov.box
        centre_x = left + draws[1] * (right - left)
        centre_y = top + draws[2] * (bottom - top)
        flip = self.flip and draws[3] < 0.5
        return Window(centre_x - side / 2, centre_y - side / 2, side, self.image_size, flip=flip)

    def draw_camera(self) -> Camera | None:
        """The camera a training tile comes from, or None (lossless, at the working scale)."""
        return draw_camera(self.jpeg, self.jpeg_quality, self.camera_coarseness)

    def normalise(self, image: Tensor, train: bool) -> Tensor:
        if train:
            image = self.photometric(image)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (image - mean) / std

    def photometric(self, image: Tensor) -> Tensor:
        """Random brightness/contrast, gamma, per-channel gain and blur (cameras differ in all four)."""
        draws = (torch.rand(6) * 2 - 1).tolist()
        if self.jitter > 0:
            mean = image.mean()
            image = ((image - mean) * (1 + draws[0] * self.jitter) + mean * (1 + draws[1] * self.jitter)).clamp_(0, 1)
        if self.gamma > 0:
            image = image.clamp(min=0).pow(math.exp(draws[2] * self.gamma))
        if self.colour > 0:
            gains = 1 + torch.tensor(draws[3:6]).view(3, 1, 1) * self.colour
            image = (image * gains).clamp_(0, 1)
        if self.blur > 0 and float(torch.rand(1)) < 0.5:
            # Softer optics, or a low-resolution camera brought up to the working scale.
            sigma = float(torch.empty(1).uniform_(0.1, self.blur))
            radius = max(1, math.ceil(2.5 * sigma))
            image = TF.gaussian_blur(image, [2 * radius + 1] * 2, [sigma, sigma]).clamp_(0, 1)
        return image


def random_window_in(base: Window, max_zoom: float, flip: bool) -> Window:
    """``base`` zoomed in by up to ``max_zoom`` at a random place, mirrored half the time."""
    draws = torch.rand(4).tolist()
    return base.zoomed(1.0 + (max_zoom - 1.0) * draws[0], draws[1], draws[2], flip and draws[3] < 0.5)


def rotate_record(record: Batch, degrees: float) -> None:
    """Rotate a training record's image and dense ``mask`` (and ``mask_fractions``, if any) by the same
    random angle in place (the corners brought in are black in the image and ignored in the mask)."""
    angle = math.radians(float((torch.rand(1) * 2 - 1) * degrees))
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]])[None]
    image = record["image"]
    grid = F.affine_grid(theta, [1, *image.shape], align_corners=False)
    # The image and the soft targets share one bilinear pass (grid_sample treats channels alike).
    fractions = record.get("mask_fractions")
    smooth = image if fractions is None else torch.cat([image, fractions.to(image.dtype)])
    turned = F.grid_sample(smooth[None], grid, mode="bilinear", align_corners=False)[0]
    record["image"] = turned[: len(image)]
    if fractions is not None:  # soft targets turn with the mask (the corners are ignored there)
        record["mask_fractions"] = turned[len(image) :].to(fractions.dtype)
    if "mask" in record:
        shifted = (record["mask"].float() + 1)[None, None]  # 0 = brought in from outside
        rotated = F.grid_sample(shifted, grid, mode="nearest", align_corners=False)[0, 0].long() - 1
        record["mask"] = torch.where(rotated < 0, torch.full_like(rotated, IGNORE_INDEX), rotated)


class TaskDataset(Dataset[Batch]):
    """Samples -> dicts with ``image`` (3, H, W), ``window`` (6,), ``index``, ``valid`` and targets."""

    def __init__(
        self,
        samples: Sequence[TaskSample],
        preprocess: Preprocess,
        prepare: TargetPreparer,
        train: bool,
        keep_decoded: int | None = None,
    ) -> None:
        if len(samples) == 0:
            raise DataError("<dataset>", "no samples")
        self.samples = list(samples)
        self.preprocess = preprocess
        self.prepare = prepare
        self.train = train
        # How many decoded (and standardised) images to keep: tiled training revisits every image
        # each epoch, and so does the validation set of a run; a one-pass prediction keeps none.
        self.keep_decoded = (64 if self.tiled_training else 0) if keep_decoded is None else keep_decoded
        self.skipped: dict[str, str] = {}
        self._cache: dict[int, tuple[np.ndarray, FieldOfView | None]] = {}
        # The photographs before the standardisation, kept beside the cache while camera tiles are drawn.
        self._raw: dict[int, RawPhotograph] = {}
        # The last photograph decoded beyond the cache (index, raw, fov, statistics): the camera tile
        # that _build may cut from it next then needs no second decode and standardisation.
        self._uncached: tuple[int, np.ndarray, FieldOfView | None, LocalStatistics | None] | None = None

    @property
    def tiled_training(self) -> bool:
        return self.train and self.preprocess.tiles

    def __len__(self) -> int:
        # Tiled training draws several crops of every image per epoch.
        return len(self.samples) * (self.preprocess.crops_per_image if self.tiled_training else 1)

    def load(self, index: int) -> tuple[np.ndarray, FieldOfView | None]:
        """The sample's image (black outside its field of view when ``fov_crop``, contrast
        standardised when ``contrast`` asks) and that field of view (None without ``fov_crop``);
        up to ``keep_decoded`` of them stay in memory."""
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        raw, fov = self._decode(index)
        image, statistics = self._standardised(raw, fov)
        if len(self._cache) < self.keep_decoded:
            self._cache[index] = (image, fov)
            if self.camera_tiles:
                self._raw[index] = self._keep_raw(raw, fov, statistics)
        elif self.camera_tiles:
            self._uncached = (index, raw, fov, statistics)
        return image, fov

    def _standardised(self, raw: np.ndarray, fov: FieldOfView | None) -> tuple[np.ndarray, LocalStatistics | None]:
        """``raw`` contrast standardised when ``contrast`` asks (with its statistics), else as it is."""
        if self.preprocess.contrast != "local" or fov is None:
            return raw, None
        result = local_statistics(raw, fov.mask, fov.width)
        return (np.zeros_like(raw), None) if result is None else (result[1], result[0])

    @property
    def camera_tiles(self) -> bool:
        """Whether some training tiles come from simulated cameras (``jpeg`` > 0, tiled training)."""
        return self.tiled_training and self.preprocess.jpeg > 0

    def _decode(self, index: int) -> tuple[np.ndarray, FieldOfView | None]:
        """The sample's photograph (black outside its field of view with ``fov_crop``) and that field of view."""
        image = self.samples[index].item.load()
        fov = None
        if self.preprocess.fov_crop:
            fov = FieldOfView.of(image, detect=True)
            image = np.where(fov.mask[..., None], image, np.uint8(0))
        return image, fov

    def raw(self, index: int) -> RawPhotograph:
        """The sample's photograph before the contrast standardisation, black outside its field of view
        (the whole image without ``fov_crop``), with the statistics that standardised it."""
        kept = self._raw.get(index)
        if kept is not None:
            return kept
        if self._uncached is not None and self._uncached[0] == index:
            _, raw, fov, statistics = self._uncached
            return self._keep_raw(raw, fov, statistics)
        raw, fov = self._decode(index)
        return self._keep_raw(raw, fov, self._standardised(raw, fov)[1])

    def _keep_raw(
        self, image: np.ndarray, fov: FieldOfView | None, statistics: LocalStatistics | None
    ) -> RawPhotograph:
        height, width = image.shape[:2]
        whole = fov or FieldOfView(np.ones((height, width), dtype=bool), (0, height, 0, width))
        # Twice as fine as the finest tile: each tile pixel still averages several 8-bit photograph
        # pixels (the standardisation magnifies a dim channel's rounding several times).
        finest = 2.0 * working_scale(whole, self.preprocess.fov_diameter) * max(1.0, self.preprocess.max_zoom)
        return RawPhotograph.keep(image, whole, finest, statistics)

    def _build(self, index: int) -> Batch:
        sample = self.samples[index]
        image, fov = self.load(index)
        height, width = image.shape[:2]
        window = self.preprocess.window(height, width, self.train, fov)
        camera = self.preprocess.draw_camera() if self.camera_tiles else None
        tile = resample_image(image, window) if camera is None else camera_tile(self.raw(index), window, camera)
        record: Batch = {
            "image": self.preprocess.normalise(tile, self.train),
            "window": window.as_tensor(),
            "source_size": torch.tensor([height, width]),
            "index": index,
            "valid": True,
        }
        record.update(self.prepare(sample, window, (height, width)))
        if self.tiled_training:
            if fov is not None and "mask" in record:
                # Outside the field of view is background to learn (predictions put it there too).
                inside = resample_inside(fov.mask, window)
                record["mask"] = torch.where(inside, record["mask"], torch.zeros_like(record["mask"]))
                if "mask_fractions" in record:
                    background = torch.zeros_like(record["mask_fractions"])
                    background[0] = 1.0
                    record["mask_fractions"] = torch.where(inside, record["mask_fractions"], background)
            if self.preprocess.rotate > 0:
                rotate_record(record, self.preprocess.rotate)
        return record

    def _skip(self, exc: DataError) -> None:
        if exc.path not in self.skipped:
            self.skipped[exc.path] = exc.reason
            logger.warning("skipped sample %s: %s", exc.path, exc.reason)

    def __getitem__(self, index: int) -> Batch:
        if not self.train:
            try:
                return self._build(index)
            except DataError as exc:
                self._skip(exc)
                return self._invalid(index)
        for offset in range(len(self.samples)):
            try:
                return self._build((index + offset) % len(self.samples))
            except DataError as exc:
                self._skip(exc)
        raise DataError("<dataset>", "no readable sample left")

    def _invalid(self, index: int) -> Batch:
        """A stand-in with the right shapes, so batching works; ``valid`` False drops it later."""
        for other in range(len(self.samples)):
            if other != index and self.samples[other].source not in self.skipped:
                try:
                    record = self._build(other)
                except DataError as exc:
                    self._skip(exc)
                    continue
                record.update(index=index, valid=False)
                return record
        raise DataError("<dataset>", "no readable sample left")


def collate(records: list[Batch]) -> Batch:
    """Stack tensors of equal shape; keep lists for anything ragged (e.g. boxes per image)."""
    batch: Batch = {}
    for key in records[0]:
        values = [r[key] for r in records]
        if isinstance(values[0], Tensor) and all(v.shape == values[0].shape for v in values):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], bool | int | float):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


def select(batch: Batch, keep: Tensor) -> Batch:
    """The rows of a batch where ``keep`` is true (tensors and lists alike)."""
    rows = keep.nonzero().flatten().tolist()
    out: Batch = {}
    for key, value in batch.items():
        if isinstance(value, Tensor):
            out[key] = value[keep]
        else:
            out[key] = [value[i] for i in rows]
    return out


def move(batch: Batch, device: torch.device) -> Batch:
    """Tensors (and tensor lists) of a batch on ``device``."""
    out: Batch = {}
    for key, value in batch.items():
        if isinstance(value, Tensor):
            out[key] = value.to(device, non_blocking=True)
        elif isinstance(value, list) and value and isinstance(value[0], Tensor):
            out[key] = [v.to(device, non_blocking=True) for v in value]
        else:
            out[key] = value
    return out
