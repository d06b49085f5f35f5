"""What `visionfm predict` writes besides the table: masks as images anyone can open, and a check that
the inputs are photographs rather than a dataset's annotation files."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# Lossless formats a mask or annotation is stored in; JPEG photographs are never masks.
_MASK_FORMATS = frozenset({"PNG", "GIF", "BMP", "TIFF", "PPM"})
MASK_MAX_COLOURS = 16  # an annotation map holds a handful of values; a photograph thousands
_BASE_PALETTE = [(0, 0, 0), (255, 255, 255), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
                 (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230)]


def palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct colours for class ids 0..num_classes-1 (0, the background, is black)."""
    colours = list(_BASE_PALETTE)
    extra = max(0, num_classes - len(colours))
    for index in range(extra):
        r, g, b = colorsys.hsv_to_rgb(index / max(1, extra), 0.8, 0.9)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return colours[:num_classes]


def mask_image(mask: np.ndarray, num_classes: int) -> Image.Image:
    """A binary mask as 0/255 greyscale; several classes as a palette PNG whose pixel values are the
    class ids (so `--mask-mode index` reads it back) and whose colours tell them apart on screen."""
    classes = np.asarray(mask, dtype=np.uint8)
    if num_classes <= 2:
        return Image.fromarray(np.where(classes > 0, 255, 0).astype(np.uint8), mode="L")
    image = Image.fromarray(classes, mode="P")
    image.putpalette([v for colour in palette(min(num_classes, 256)) for v in colour])
    return image


def mask_file_names(sources: Sequence[tuple[str, int | None]]) -> list[str]:
    """`<stem>_mask.png` per (source, frame); frames of a volume add `_frame<N>`, and a stem met twice
    (same name in two folders) is prefixed with its folder, then numbered, so no mask overwrites another."""
    names: list[str] = []
    used: set[str] = set()
    for source, frame in sources:
        path = Path(source)
        stem = path.stem + _frame_suffix(frame, _is_volume(sources, source))
        candidate = f"{stem}_mask.png"
        if candidate in used:
            candidate = f"{path.parent.name}_{stem}_mask.png"
        number = 2
        while candidate in used:
            candidate = f"{path.parent.name}_{stem}_{number}_mask.png"
            number += 1
        used.add(candidate)
        names.append(candidate)
    return names


def _frame_suffix(frame: int | None, volume: bool) -> str:
    if frame is None or (frame == 0 and not volume):
        return ""
    return f"_fundus{-frame}" if frame < 0 else f"_frame{frame}"


def _is_volume(sources: Sequence[tuple[str, int | None]], source: str) -> bool:
    return sum(1 for s, _ in sources if s == source) > 1


def save_masks(predictions: list[dict[str, Any]], folder: Path, num_classes: int) -> int:
    """Write each prediction's mask as `<stem>_mask.png` in `folder`, recording `mask_file`; returns
    how many were written."""
    with_masks = [p for p in predictions if p.get("mask") is not None]
    if not with_masks:
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    names = mask_file_names([(p["source"], p.get("frame")) for p in with_masks])
    for prediction, name in zip(with_masks, names, strict=True):
        mask_image(prediction.pop("mask"), num_classes).save(folder / name)
        prediction["mask_file"] = str(folder / name)
    return len(with_masks)


def looks_like_mask(path: str | Path) -> bool:
    """True for a lossless image of a few flat values (a vessel map, a lesion or label mask) rather
    than a photograph. Reads the file; any reading trouble counts as "no" (the reader reports it)."""
    try:
        with Image.open(path) as image:
            if image.format not in _MASK_FORMATS:
                return False
            if image.mode == "1":
                return True
            return image.getcolors(maxcolors=MASK_MAX_COLOURS) is not None
    except Exception:  # Pillow raises assorted types on odd files; the prediction names them anyway
        return False
