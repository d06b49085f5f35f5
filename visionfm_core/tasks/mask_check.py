"""Preflight of segmentation samples: every mask (and field-of-view mask) can be read and has its
image's size. Training would skip such a pair later, one sample at a time and without a word at the
start; a site should hear about it before it joins."""

from __future__ import annotations

from collections.abc import Iterable

from visionfm_core.errors import DataError
from visionfm_core.tasks.samples import MaskEncoding, TaskSample, decode_mask


def _size(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[0]}"


def mask_pair_problems(samples: Iterable[TaskSample]) -> list[str]:
    """One line per bad image/mask pair, naming both files (local console only: these are paths)."""
    problems: list[str] = []
    for sample in samples:
        masks = [(kind, m) for kind, m in (("mask", sample.mask), ("field-of-view mask", sample.fov))
                 if isinstance(m, str)]
        if not masks:
            continue
        try:
            image_shape = sample.item.load().shape[:2]
        except DataError as exc:
            problems.append(f"image {sample.source} (with mask {masks[0][1]}) is unreadable: {exc.reason}")
            continue
        for kind, path in masks:
            try:
                mask_shape = decode_mask(path, MaskEncoding("binary"), 2).shape[:2]
            except DataError as exc:
                problems.append(f"{kind} {path} of image {sample.source} is unreadable: {exc.reason}")
                continue
            if mask_shape != image_shape:
                problems.append(f"{kind} {path} is {_size(mask_shape)} but its image {sample.source} is "
                                f"{_size(image_shape)}")
    return problems
