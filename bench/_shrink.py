"""Task samples shrunk in memory, so a bench can fine-tune on full-size photographs at a fraction of the CPU."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
from PIL import Image

from visionfm_core.data.items import ImageItem
from visionfm_core.tasks.samples import MaskEncoding, TaskSample, decode_mask


def _vote(binary: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A 0/1 mask shrunk to ``size`` by majority, as the 0/255 pixels a mask file holds."""
    shares = np.asarray(Image.fromarray((binary * 255).astype(np.uint8)).resize(size, Image.Resampling.BOX))
    return ((shares >= 128) * 255).astype(np.uint8)


def shrink(sample: TaskSample, factor: int) -> TaskSample:
    """The sample with its photograph reduced ``factor`` times in memory (binary masks by vote, points scaled)."""
    with Image.open(sample.source) as image:
        size = (image.width // factor, image.height // factor)
        array = np.asarray(image.convert("RGB").reduce(factor))[: size[1], : size[0]]
    changes: dict[str, Any] = {
        "item": ImageItem(
            sample.source, sample.label, patient_key=sample.item.patient_key, _array=np.ascontiguousarray(array)
        )
    }
    # Masks stay raw pixel values (0/255), decoded by the task like a mask file would be.
    if sample.mask is not None:
        changes["mask"] = _vote(decode_mask(sample.mask, MaskEncoding(), 2), size)
    if sample.fov is not None:
        changes["fov"] = _vote(decode_mask(sample.fov, MaskEncoding(), 2), size)
    if sample.points is not None:
        changes["points"] = tuple((x / factor, y / factor) for x, y in sample.points)
    return replace(sample, **changes)
