"""The network input's shape: square for round photographs, the data's own aspect ratio for B-scans.

An OCT B-scan is a wide rectangle (512x496 up to 1536x496 on Spectralis, 550x224 elsewhere);
letterboxed into a square, the retina fills a thin band of the input. For a modality with
``native_aspect`` the input takes the training set's median aspect ratio instead, with as many
patches as the square ``image_size`` input would have (the same cost per image), each side a
multiple of the patch size and the long side at most ``MAX_SIDE_FACTOR`` times ``image_size``.

A federation cannot measure that median: every site must train at the same input shape (they share
one set of weights, position embedding included), and no site may send statistics of its images. Its
``auto`` is therefore the modality's fixed ``federated_aspect`` (OCT 2:1, between the 768x496 and
1024x496 Spectralis exports and the 550x224 B-scans of public DME sets; 1:1 for round fundus
photographs), and a coordinator whose hospitals scan otherwise sets ``finetune-input-aspect`` to their
W:H. The image is always letterboxed with its own aspect kept, so a wrong guess costs resolution, never
distortion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from visionfm_core.data.items import ImageItem
from visionfm_core.errors import ConfigError, DataError
from visionfm_core.modalities import get_modality

# The long side never exceeds this many times image_size (a 4:1 aspect at the most).
MAX_SIDE_FACTOR = 2.0
# Images looked at to find the median aspect ratio (spread over the set; headers only for files).
ASPECT_SAMPLE = 64


def image_hw(item: ImageItem) -> tuple[int, int]:
    """(height, width) of an item, from the file header where the format allows."""
    if item._array is not None:
        return int(item._array.shape[0]), int(item._array.shape[1])
    if item._loader is None and item.frame is None:
        try:
            with Image.open(item.source) as image:
                width, height = image.size
                return int(height), int(width)
        except (OSError, UnidentifiedImageError):
            pass  # DICOM and vendor formats: decode below
    shape = item.load().shape
    return int(shape[0]), int(shape[1])


def median_aspect(items: Sequence[ImageItem], sample: int = ASPECT_SAMPLE) -> float:
    """Median width / height of up to ``sample`` items spread over ``items`` (unreadable ones skipped;
    1.0 when none can be read)."""
    if not items:
        return 1.0
    picks = np.unique(np.linspace(0, len(items) - 1, min(sample, len(items))).round().astype(int))
    ratios = []
    for index in picks:
        try:
            height, width = image_hw(items[int(index)])
        except DataError:
            continue
        ratios.append(width / max(1, height))
    return float(np.median(ratios)) if ratios else 1.0


def input_shape(aspect: float, image_size: int, patch_size: int) -> tuple[int, int]:
    """(height, width) of an input with aspect ``aspect`` (width / height) and about as many
    ``patch_size`` patches as an ``image_size`` square; exactly the square when the rounding says so."""
    if not aspect > 0 or not math.isfinite(aspect):
        raise ConfigError("input_aspect", f"must be a positive number, got {aspect}")
    if patch_size <= 0 or image_size % patch_size:
        raise ConfigError("image_size", f"{image_size} is not a multiple of patch size {patch_size}")
    longest = MAX_SIDE_FACTOR * image_size
    width = min(longest, image_size * math.sqrt(aspect))
    height = min(longest, image_size / math.sqrt(aspect))

    def to_patches(length: float) -> int:
        return max(patch_size, round(length / patch_size) * patch_size)

    return to_patches(height), to_patches(width)


def parse_aspect(setting: str | float) -> float | None:
    """``auto`` -> None (the modality decides), ``square`` -> 1.0, ``W:H`` or a number -> width/height."""
    if isinstance(setting, int | float):
        value = float(setting)
    else:
        text = setting.strip().lower()
        if text == "auto":
            return None
        if text == "square":
            return 1.0
        try:
            if ":" in text:
                width, height = (float(part) for part in text.split(":", 1))
                value = width / height
            else:
                value = float(text)
        except (ValueError, ZeroDivisionError) as exc:
            raise ConfigError("input_aspect", f"use auto, square, W:H or a number, got {setting!r}") from exc
    if not value > 0 or not math.isfinite(value):
        raise ConfigError("input_aspect", f"must be positive, got {setting!r}")
    return value


def choose_aspect(setting: str | float, modality: str, items: Sequence[ImageItem]) -> float:
    """The input's width / height: given, or (``auto``) the median of ``items`` for a modality that
    keeps its aspect ratio and 1.0 (square) otherwise."""
    value = parse_aspect(setting)
    if value is not None:
        return value
    return median_aspect(items) if get_modality(modality).native_aspect else 1.0


def federated_aspect(setting: str | float, modality: str) -> float:
    """The input's width / height in a federation: given, or (``auto``) the modality's fixed
    ``federated_aspect``; nothing is read from any site's images."""
    value = parse_aspect(setting)
    return get_modality(modality).federated_aspect if value is None else value
