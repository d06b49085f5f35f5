"""Where a network input comes from in its source image, and resampling images and label maps there.

Every input is a window of the source (it may reach beyond the image; that part is black and not
scored) resampled to ``rows x size`` input pixels with one scale for both axes: square for fundus
photographs, as wide as the data for OCT B-scans (``rows`` < ``size``), so a B-scan is never shrunk
into a square. Evaluation uses the letterbox window (the whole image, aspect kept, centred), so
images of any size and camera fit one model; training may zoom, shift and mirror the window.
Because the window is kept, predictions map back to source pixels exactly: landmark and box
coordinates, and masks at the source resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from visionfm_core.evaluation.task_metrics import IGNORE_INDEX


@dataclass(frozen=True)
class Window:
    """Source rectangle from ``(x0, y0)``, ``side`` source pixels wide, shown on an input ``size``
    pixels wide and ``rows`` high (``height``; 0 = square) at one scale, optionally mirrored."""

    x0: float
    y0: float
    side: float
    size: int
    flip: bool = False
    height: int = 0

    @property
    def scale(self) -> float:
        """Input pixels per source pixel (both axes)."""
        return self.size / self.side

    @property
    def rows(self) -> int:
        """Input height in pixels."""
        return self.height or self.size

    @property
    def source_height(self) -> float:
        """Source pixels the window covers vertically."""
        return self.rows / self.scale

    def to_input(self, points: np.ndarray) -> np.ndarray:
        """(..., 2) source x, y -> input x, y."""
        out = (np.asarray(points, dtype=np.float64) - (self.x0, self.y0)) * self.scale
        if self.flip:
            out[..., 0] = self.size - out[..., 0]
        return out

    def to_source(self, points: np.ndarray) -> np.ndarray:
        """(..., 2) input x, y -> source x, y (the inverse of :meth:`to_input`)."""
        out = np.array(points, dtype=np.float64)
        if self.flip:
            out[..., 0] = self.size - out[..., 0]
        return out / self.scale + (self.x0, self.y0)

    def boxes_to_input(self, boxes: np.ndarray) -> np.ndarray:
        """(N, 4) x0, y0, x1, y1 source boxes -> input boxes (corners re-ordered after mirroring)."""
        corners = self.to_input(np.asarray(boxes, dtype=np.float64).reshape(-1, 2, 2))
        return np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)

    def boxes_to_source(self, boxes: np.ndarray) -> np.ndarray:
        corners = self.to_source(np.asarray(boxes, dtype=np.float64).reshape(-1, 2, 2))
        return np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)

    def as_tensor(self) -> Tensor:
        values = [self.x0, self.y0, self.side, float(self.size), float(self.flip), float(self.rows)]
        return torch.tensor(values, dtype=torch.float64)

    @classmethod
    def from_tensor(cls, values: Tensor) -> Window:
        x0, y0, side, size, flip, *rows = values.tolist()
        height = int(rows[0]) if rows and int(rows[0]) != int(size) else 0
        return cls(x0, y0, side, int(size), bool(flip), height)

    def zoomed(self, zoom: float, across: float, down: float, flip: bool) -> Window:
        """This window ``zoom`` times closer (same input shape); ``across``/``down`` in [0, 1] place it
        within the original."""
        side = self.side / zoom
        return Window(
            self.x0 + across * (self.side - side),
            self.y0 + down * (self.source_height - self.source_height / zoom),
            side,
            self.size,
            flip,
            self.height,
        )


def letterbox(height: int, width: int, size: int, rows: int | None = None) -> Window:
    """The whole image, aspect ratio kept, centred in a ``rows`` x ``size`` input (square by default)."""
    rows = rows or size
    scale = min(size / width, rows / height)
    side, covered = size / scale, rows / scale
    return Window((width - side) / 2.0, (height - covered) / 2.0, side, size, height=0 if rows == size else rows)


def random_window(
    height: int, width: int, size: int, max_zoom: float, flip: bool, generator: torch.Generator | None = None
) -> Window:
    """A training window: the letterbox zoomed in by up to ``max_zoom`` at a random place."""
    base = letterbox(height, width, size)
    draws = torch.rand(4, generator=generator).tolist()
    return base.zoomed(1.0 + (max_zoom - 1.0) * draws[0], draws[1], draws[2], flip and draws[3] < 0.5)


@dataclass(frozen=True)
class _Placement:
    """Integer source crop, its resized shape, and the part of it that lands on the input canvas."""

    top: int
    bottom: int
    left: int
    right: int
    resized_height: int
    resized_width: int
    # Where the resized crop starts on the canvas (may be negative: then its first rows/cols are cut).
    out_top: int
    out_left: int

    def paste(self, canvas: Tensor, resized: Tensor) -> None:
        """Copy ``resized`` (..., h, w) onto ``canvas`` (..., S, S), clipped to both."""
        size_y, size_x = canvas.shape[-2:]
        y0, x0 = max(0, self.out_top), max(0, self.out_left)
        y1 = min(size_y, self.out_top + self.resized_height)
        x1 = min(size_x, self.out_left + self.resized_width)
        if y1 > y0 and x1 > x0:
            canvas[..., y0:y1, x0:x1] = resized[
                ..., y0 - self.out_top : y1 - self.out_top, x0 - self.out_left : x1 - self.out_left
            ]


def _placement(window: Window, height: int, width: int) -> _Placement | None:
    left, top = max(0, math.floor(window.x0)), max(0, math.floor(window.y0))
    right = min(width, math.ceil(window.x0 + window.side))
    bottom = min(height, math.ceil(window.y0 + window.source_height))
    if right <= left or bottom <= top:
        return None
    scale = window.scale
    return _Placement(
        top,
        bottom,
        left,
        right,
        resized_height=max(1, round((bottom - top) * scale)),
        resized_width=max(1, round((right - left) * scale)),
        out_top=round((top - window.y0) * scale),
        out_left=round((left - window.x0) * scale),
    )


def resample_image(image: np.ndarray, window: Window) -> Tensor:
    """(H, W, 3) uint8 -> (3, rows, size) float in [0, 1]; outside the image is black."""
    canvas = torch.zeros(3, window.rows, window.size)
    place = _placement(window, image.shape[0], image.shape[1])
    if place is not None:
        crop = torch.from_numpy(np.array(image[place.top : place.bottom, place.left : place.right]))
        crop = crop.permute(2, 0, 1).float().div_(255.0)[None]
        resized = F.interpolate(
            crop,
            size=(place.resized_height, place.resized_width),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )[0].clamp_(0.0, 1.0)
        place.paste(canvas, resized)
    return canvas.flip(-1) if window.flip else canvas


def box_shares(planes: np.ndarray, width: int, height: int) -> np.ndarray:
    """(K, h, w) bool planes -> (K, height, width) uint8: each plane's share of every output pixel's
    source area, in 0..255 (Pillow's box filter). Three planes go through one RGB resize: Pillow
    resamples the bands of an 8-bit image independently with the same fixed-point arithmetic as a
    single band, so the shares are the same, for a third of the calls."""
    out = np.empty((len(planes), height, width), dtype=np.uint8)
    for start in range(0, len(planes), 3):
        group = planes[start : start + 3]
        bands = np.zeros((*group.shape[1:], 3), dtype=np.uint8)
        for k, plane in enumerate(group):
            bands[..., k] = plane
        bands *= np.uint8(255)
        resized = Image.fromarray(bands, "RGB").resize((width, height), Image.Resampling.BOX)
        out[start : start + len(group)] = np.moveaxis(np.asarray(resized), -1, 0)[: len(group)]
    return out


def _class_votes(labels: np.ndarray, window: Window, num_classes: int) -> tuple[np.ndarray, _Placement] | None:
    """Each code's (classes, then ignore) share of every input pixel's source area, in 0..255:
    (num_classes + 1, h, w) uint8 over the placed crop, with its placement; None off the image."""
    place = _placement(window, labels.shape[0], labels.shape[1])
    if place is None:
        return None
    crop = labels[place.top : place.bottom, place.left : place.right]
    codes = np.asarray([*range(num_classes), IGNORE_INDEX], dtype=crop.dtype)
    planes = crop[None] == codes[:, None, None]
    return box_shares(planes, place.resized_width, place.resized_height), place


def _first_largest(votes: np.ndarray) -> np.ndarray:
    """``votes.argmax(0)`` (ties to the first): numpy's argmax along the leading axis of a few large
    planes is several times slower than comparing the planes."""
    best, index = votes[0].copy(), np.zeros(votes.shape[1:], dtype=np.int64)
    for k in range(1, len(votes)):
        larger = votes[k] > best
        index[larger] = k
        np.maximum(best, votes[k], out=best)
    return index


def _winner(votes: np.ndarray, num_classes: int) -> Tensor:
    codes = np.asarray([*range(num_classes), IGNORE_INDEX], dtype=np.int64)
    return torch.from_numpy(codes[_first_largest(votes)])


def resample_inside(mask: np.ndarray, window: Window) -> Tensor:
    """(H, W) bool region -> (rows, size) bool: the input pixels whose source area lies mostly inside
    it (more than outside; never outside the image): ``resample_labels(mask, window, 2) == 1``
    without the ignore code's vote, which a 0/1 map never wins."""
    canvas = torch.zeros((window.rows, window.size), dtype=torch.bool)
    place = _placement(window, mask.shape[0], mask.shape[1])
    if place is not None:
        crop = mask[place.top : place.bottom, place.left : place.right].astype(bool, copy=False)
        outside, inside = box_shares(np.stack([~crop, crop]), place.resized_width, place.resized_height)
        place.paste(canvas, torch.from_numpy(inside > outside))
    return canvas.flip(-1) if window.flip else canvas


def resample_labels(labels: np.ndarray, window: Window, num_classes: int) -> Tensor:
    """(H, W) class map -> (rows, size) long; each output pixel takes the class covering most of it
    (an area vote, so shrinking does not alias), outside the image = ignore."""
    canvas = torch.full((window.rows, window.size), IGNORE_INDEX, dtype=torch.long)
    counted = _class_votes(labels, window, num_classes)
    if counted is not None:
        votes, place = counted
        place.paste(canvas, _winner(votes, num_classes))
    return canvas.flip(-1) if window.flip else canvas


def resample_label_fractions(labels: np.ndarray, window: Window, num_classes: int) -> tuple[Tensor, Tensor]:
    """(H, W) class map -> the (rows, size) class map of :func:`resample_labels` and (num_classes,
    rows, size) float: each class's share of the labelled source area under each input pixel (rows
    sum to 1; all zero where the map is ignored). Shrinking a photograph makes a vessel narrower
    than an input pixel lose the vote and vanish from the class map, although it covers a third or
    half of the pixel; its share keeps it, as a soft target of that value."""
    canvas = torch.full((window.rows, window.size), IGNORE_INDEX, dtype=torch.long)
    fractions = torch.zeros((num_classes, window.rows, window.size), dtype=torch.float32)
    counted = _class_votes(labels, window, num_classes)
    if counted is not None:
        votes, place = counted
        winner = _winner(votes, num_classes)
        shares = torch.from_numpy(votes[:num_classes].astype(np.float32))
        shares = shares / shares.sum(0, keepdim=True).clamp_min(1.0)
        shares = torch.where(winner == IGNORE_INDEX, torch.zeros_like(shares), shares)
        place.paste(canvas, winner)
        place.paste(fractions, shares)
    if window.flip:
        return canvas.flip(-1), fractions.flip(-1)
    return canvas, fractions


def logits_to_source(logits: Tensor, window: Window, height: int, width: int) -> Tensor:
    """(C, rows, size) input-resolution scores -> (C, height, width) at the source's pixels."""
    ys = torch.arange(height, dtype=torch.float64) + 0.5
    xs = torch.arange(width, dtype=torch.float64) + 0.5
    u = (xs - window.x0) * window.scale
    v = (ys - window.y0) * window.scale
    if window.flip:
        u = window.size - u
    grid_x = (2.0 * u / window.size - 1.0).float()
    grid_y = (2.0 * v / window.rows - 1.0).float()
    grid = torch.stack(torch.meshgrid(grid_y, grid_x, indexing="ij")[::-1], dim=-1)[None]
    out: Tensor = F.grid_sample(
        logits[None].float(),
        grid.to(logits.device),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )[0]
    return out
