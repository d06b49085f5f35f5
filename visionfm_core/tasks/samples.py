"""One labelled example of a downstream task, and decoding of segmentation masks.

A `TaskSample` wraps the site's `ImageItem` and whatever targets the task has: a class, several
labels, continuous values, a mask file (png/gif/tif; binary, class-index or colour-coded) with an
optional field-of-view mask, landmark points, or boxes. Coordinates are in source-image pixels
(x to the right, y down); a missing point is ``nan``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from visionfm_core.data.items import ImageItem
from visionfm_core.data.readers import MAX_PIXELS
from visionfm_core.errors import ConfigError, DataError
from visionfm_core.evaluation.task_metrics import IGNORE_INDEX

MaskSource = str | np.ndarray
RGB = tuple[int, int, int]


@dataclass(frozen=True)
class TaskSample:
    """An image with its targets; only the fields the task needs are set.

    ``mask`` and ``fov`` are a file path or an array of the raw pixel values such a file holds (e.g.
    0/255 or colours); the task's `MaskEncoding` decodes both the same way.
    """

    item: ImageItem
    label: int | None = None
    labels: tuple[int, ...] | None = None
    values: tuple[float, ...] | None = None
    mask: MaskSource | None = field(default=None, compare=False)
    fov: MaskSource | None = field(default=None, compare=False)
    points: tuple[tuple[float, float], ...] | None = None
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    box_labels: tuple[int, ...] = ()

    @property
    def source(self) -> str:
        return self.item.source


@dataclass(frozen=True)
class MaskEncoding:
    """How a mask file's pixels become class ids (0 = background, ``IGNORE_INDEX`` = not scored).

    - ``binary``: foreground where any channel is above half range (or above 0 for 0/1 masks).
    - ``index``: the pixel value is the class id (single-channel or palette images).
    - ``colour``: exact RGB colours map to ids; any other colour (e.g. an overlap) is ignored.
    """

    mode: Literal["binary", "index", "colour"] = "binary"
    colours: tuple[tuple[RGB, int], ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in ("binary", "index", "colour"):
            raise ConfigError("mask_encoding", f"unknown mode {self.mode!r}; use binary, index or colour")
        if self.mode == "colour" and not self.colours:
            raise ConfigError("mask_colours", "colour-coded masks need a colour -> class table")

    def to_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "colours": [[list(rgb), cls] for rgb, cls in self.colours]}

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> MaskEncoding:
        colours = tuple((tuple(int(c) for c in rgb), int(k)) for rgb, k in raw.get("colours", []))  # type: ignore[attr-defined]
        return cls(mode=raw.get("mode", "binary"), colours=colours)  # type: ignore[arg-type]

    @classmethod
    def parse_colours(cls, spec: str) -> MaskEncoding:
        """From text like ``"0,0,0=0;255,255,0=1"`` (the CLI's ``--mask-colours``)."""
        table: list[tuple[RGB, int]] = []
        for entry in filter(None, (part.strip() for part in spec.split(";"))):
            try:
                colour, cls_id = entry.split("=")
                r, g, b = (int(v) for v in colour.split(","))
                table.append(((r, g, b), int(cls_id)))
            except ValueError as exc:
                raise ConfigError("mask_colours", f"cannot read {entry!r}; expected R,G,B=CLASS") from exc
        return cls(mode="colour", colours=tuple(table))


def _open_mask(source: MaskSource, mode: str) -> np.ndarray:
    if isinstance(source, np.ndarray):
        return source
    name = str(source)
    try:
        with Image.open(source) as image:
            if image.width * image.height > MAX_PIXELS:
                raise DataError(name, f"mask too large ({image.width}x{image.height} pixels)")
            if mode == "index":
                # Palette indices or grey values are the class ids: do not convert colours.
                return np.asarray(image if image.mode in ("L", "P", "I", "I;16") else image.convert("L"))
            if image.mode in ("1", "L") and mode == "binary":
                return np.asarray(image.convert("L"))  # grey masks need no colour conversion
            return np.asarray(image.convert("RGB"))
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(name, "mask file not found") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(name, f"not a readable mask image ({type(exc).__name__})") from exc


def decode_mask(source: MaskSource, encoding: MaskEncoding, num_classes: int) -> np.ndarray:
    """A mask as an (H, W) uint8 class map; unknown colours and out-of-range ids become ignored."""
    name = source if isinstance(source, str) else "<mask array>"
    raw = _open_mask(source, encoding.mode)
    if raw.ndim not in (2, 3) or min(raw.shape[:2]) == 0:
        raise DataError(name, f"unsupported mask shape {raw.shape}")
    if encoding.mode == "binary":
        strength = raw.max(axis=2) if raw.ndim == 3 else raw
        threshold = 0 if strength.max(initial=0) <= 1 else strength.max() / 2
        return (strength > threshold).astype(np.uint8)
    if encoding.mode == "index":
        values = raw[..., 0] if raw.ndim == 3 else raw
        labels = np.where(values < num_classes, values, IGNORE_INDEX)
        return labels.astype(np.uint8)
    rgb = raw if raw.ndim == 3 else np.repeat(raw[..., None], 3, axis=2)
    labels = np.full(rgb.shape[:2], IGNORE_INDEX, dtype=np.uint8)
    packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    for (r, g, b), cls_id in encoding.colours:
        labels[packed == ((r << 16) | (g << 8) | b)] = cls_id
    return labels


def load_target_mask(
    sample: TaskSample, encoding: MaskEncoding, num_classes: int, shape: tuple[int, int]
) -> np.ndarray:
    """The sample's class map with pixels outside its field of view set to ``IGNORE_INDEX``."""
    if sample.mask is None:
        raise DataError(sample.source, "segmentation needs a mask for every image, this one has none")
    labels = decode_mask(sample.mask, encoding, num_classes)
    mask_name = sample.mask if isinstance(sample.mask, str) else sample.source
    if labels.shape != shape:
        raise DataError(
            str(mask_name),
            f"mask is {labels.shape[1]}x{labels.shape[0]} but its image is {shape[1]}x{shape[0]}",
        )
    if sample.fov is not None:
        fov = decode_mask(sample.fov, MaskEncoding("binary"), 2)
        if fov.shape != shape:
            fov_name = sample.fov if isinstance(sample.fov, str) else sample.source
            raise DataError(str(fov_name), "field-of-view mask size differs from its image")
        labels = np.where(fov > 0, labels, IGNORE_INDEX).astype(np.uint8)
    return labels


def relative_to(base: Path, value: str) -> str:
    """A manifest path resolved against the manifest's folder (absolute paths are kept)."""
    path = Path(value)
    return str(path if path.is_absolute() else base / path)
