"""Dense prediction on whole photographs: the field of view, a working scale, overlapping tiles.

A dense model is trained on tiles (crops at the working resolution) and predicts a photograph of any
size the same way: the fundus field of view is found (fast, on a thumbnail), the image is resampled
so that the field of view is ``fov_diameter`` pixels wide (or kept at its own resolution), cut into
overlapping tiles whose scores are blended with weights that fall off towards each tile's border
(no seams), and the scores are brought back to every source pixel. Outside the field of view the
output is background.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from visionfm_core.data.preprocess import fast_fundus_fov, mask_box

Forward = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class FieldOfView:
    """A photograph's field-of-view mask and its bounding box (top, bottom, left, right)."""

    mask: np.ndarray
    box: tuple[int, int, int, int]

    @classmethod
    def of(cls, image: np.ndarray, detect: bool) -> FieldOfView:
        """Detected on fundus photographs; the whole image otherwise."""
        mask = fast_fundus_fov(image) if detect else np.ones(image.shape[:2], dtype=bool)
        return cls(mask, mask_box(mask))

    @property
    def width(self) -> int:
        return self.box[3] - self.box[2]


def working_scale(fov: FieldOfView, fov_diameter: int) -> float:
    """Working pixels per source pixel: the field of view ``fov_diameter`` wide, or 1 (native)."""
    return fov_diameter / max(1, fov.width) if fov_diameter > 0 else 1.0


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile offsets covering ``length`` with the last tile flush with the end (``length >= tile``)."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def blend_weights(tile: int) -> Tensor:
    """(tile, tile) weights, 1 in the middle falling linearly to a small floor at the border: a pixel
    near one tile's edge is decided by the tile that sees it in the middle."""
    ramp = torch.minimum(torch.arange(tile) + 0.5, tile - torch.arange(tile) - 0.5) / (tile / 4)
    edge = ramp.clamp(0.05, 1.0)
    return edge[:, None] * edge[None, :]


FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


def flip_averaged(forward: Forward) -> Forward:
    """``forward`` averaged over a batch's four mirror images (none, left-right, up-down, both), each
    mirrored back: test-time augmentation for a dense model trained with flips. Exact for a model
    that is itself mirror-symmetric; otherwise it smooths the model's orientation errors."""

    def averaged(tiles: Tensor) -> Tensor:
        total: Tensor | None = None
        for dims in FLIPS:
            out = forward(tiles.flip(dims) if dims else tiles).float()
            out = out.flip(dims) if dims else out
            total = out if total is None else total + out
        assert total is not None
        return total / len(FLIPS)

    return averaged


def sliding_window(
    forward: Forward, image: Tensor, tile: int, overlap: float, batch_size: int = 8
) -> Tensor:
    """(C_in, H, W) -> (C_out, H, W) scores of ``forward`` on overlapping ``tile`` squares, blended.

    An image smaller than a tile is padded (with zeros, i.e. the normalised mean) and cropped back.
    Where every tile covering a pixel sees the same content the result equals ``forward`` on the
    whole image there; weights only decide between tiles that disagree.
    """
    _, height, width = image.shape
    pad_h, pad_w = max(0, tile - height), max(0, tile - width)
    padded = F.pad(image, (0, pad_w, 0, pad_h)) if pad_h or pad_w else image
    full_h, full_w = padded.shape[-2:]
    stride = max(1, round(tile * (1.0 - overlap)))
    corners = [(y, x) for y in tile_starts(full_h, tile, stride) for x in tile_starts(full_w, tile, stride)]
    weights = blend_weights(tile).to(image.device)
    scores: Tensor | None = None
    total = torch.zeros(full_h, full_w, device=image.device)
    for first in range(0, len(corners), batch_size):
        chunk = corners[first : first + batch_size]
        batch = torch.stack([padded[:, y : y + tile, x : x + tile] for y, x in chunk])
        out = forward(batch).float()
        if scores is None:
            scores = torch.zeros(out.shape[1], full_h, full_w, device=image.device)
        for (y, x), tile_scores in zip(chunk, out, strict=True):
            scores[:, y : y + tile, x : x + tile] += tile_scores * weights
            total[y : y + tile, x : x + tile] += weights
    assert scores is not None
    return (scores / total)[:, :height, :width]


def to_working(image: np.ndarray, fov: FieldOfView, scale: float) -> tuple[Tensor, Tensor]:
    """The field-of-view box of ``image`` (H, W, 3 uint8) at the working scale as (3, h, w) floats in
    [0, 1], black outside the field of view, and the (h, w) bool field-of-view mask there."""
    top, bottom, left, right = fov.box
    crop = torch.from_numpy(np.ascontiguousarray(image[top:bottom, left:right])).permute(2, 0, 1).float() / 255.0
    mask = torch.from_numpy(np.ascontiguousarray(fov.mask[top:bottom, left:right]))
    size = (max(1, round((bottom - top) * scale)), max(1, round((right - left) * scale)))
    if size != tuple(crop.shape[-2:]):
        crop = F.interpolate(crop[None], size=size, mode="bilinear", antialias=scale < 1, align_corners=False)[0]
        mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0] > 0.5
    crop = crop.clamp_(0.0, 1.0) * mask
    return crop, mask


def to_source(probabilities: Tensor, fov: FieldOfView, height: int, width: int) -> Tensor:
    """(C, h, w) working-scale class probabilities -> (C, H, W) at the source's pixels, class 0
    (background) certain outside the field of view."""
    top, bottom, left, right = fov.box
    inside = F.interpolate(
        probabilities[None], size=(bottom - top, right - left), mode="bilinear", align_corners=False
    )[0]
    out = torch.zeros(probabilities.shape[0], height, width, device=probabilities.device)
    out[0] = 1.0
    out[:, top:bottom, left:right] = inside
    outside = torch.from_numpy(~fov.mask).to(out.device)
    out[:, outside] = 0.0
    out[0, outside] = 1.0
    return out
