"""DINO's photometric augmentations applied to a whole batch of one view at once.

Every image still gets its own random draws (whether it is jittered, blurred, solarised or turned
grey, and by how much); only the arithmetic is batched, so a batch costs a few dozen tensor ops
instead of a few dozen per image. The maths follows torchvision's float kernels:
- brightness: x * b; contrast: blend with the image's mean grey level; saturation: blend with its
  grey version; hue: rotation in HSV (torchvision's kernel, per image, used only where hue > 0).
  The four are applied in one random order per batch (torchvision draws an order per image).
- grayscale: ITU-R 601 luma, replicated to three channels.
- Gaussian blur: a separable kernel per image (sigma drawn per image), reflect padding.
- solarisation: values at or above 128/255 are inverted.
Each jitter step clamps to [0, 1], as torchvision does for float images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

_LUMA = (0.299, 0.587, 0.114)
_SOLARIZE_THRESHOLD = 128 / 255


@dataclass(frozen=True)
class Photometric:
    """The colour/blur/solarise/normalise stage of one multi-crop view, batched: [B, 3, h, w] uint8 (or
    float in [0, 1]) -> normalised float32."""

    brightness: float
    contrast: float
    saturation: float
    hue: float
    jitter_prob: float
    grayscale_prob: float
    blur_prob: float
    blur_sigma: tuple[float, float]
    solarize_prob: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        batch = x.shape[0]
        if self.jitter_prob > 0 and (self.brightness or self.contrast or self.saturation or self.hue):
            x = self._jitter(x, _draw(batch, self.jitter_prob))
        if self.grayscale_prob > 0:
            chosen = _draw(batch, self.grayscale_prob).to(x.device)
            x = torch.where(chosen[:, None, None, None], _grey(x).expand_as(x), x)
        if self.blur_prob > 0:
            chosen = _draw(batch, self.blur_prob)
            if bool(chosen.all()):
                x = self._blur(x, chosen)
            elif bool(chosen.any()):  # blur only the chosen images: at 224 px the blur is the costliest step
                picked = chosen.to(x.device)
                blurred = self._blur(x[picked], torch.ones(int(chosen.sum()), dtype=torch.bool))
                x = x.index_put((picked,), blurred)  # a new tensor: the caller's batch is never changed
        if self.solarize_prob > 0:
            chosen = _draw(batch, self.solarize_prob).to(x.device)[:, None, None, None]
            x = torch.where(chosen & (x >= _SOLARIZE_THRESHOLD), 1.0 - x, x)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def _jitter(self, x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        steps = [name for name, amount in (("brightness", self.brightness), ("contrast", self.contrast),
                                           ("saturation", self.saturation), ("hue", self.hue)) if amount]
        for index in torch.randperm(len(steps)).tolist():
            name = steps[index]
            if name == "hue":
                shifts = (torch.rand(batch) * 2 - 1) * self.hue
                for i in torch.nonzero(chosen).flatten().tolist():
                    x[i] = TF.adjust_hue(x[i], float(shifts[i]))
                continue
            amount = getattr(self, name)
            factor = torch.empty(batch).uniform_(max(0.0, 1 - amount), 1 + amount)
            factor = torch.where(chosen, factor, torch.ones(batch)).to(x.device, x.dtype).view(-1, 1, 1, 1)
            if name == "brightness":
                x = x * factor
            elif name == "contrast":
                mean_grey = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
                x = x * factor + mean_grey * (1 - factor)
            else:
                x = x * factor + _grey(x) * (1 - factor)
            x = x.clamp_(0.0, 1.0)
        return x

    def _blur(self, x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        low, high = self.blur_sigma
        radius = min(math.ceil(3 * high), height - 1, width - 1)
        if radius < 1 or not bool(chosen.any()):
            return x
        sigma = torch.empty(batch).uniform_(low, high)
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernels = torch.exp(-(offsets[None, :] ** 2) / (2 * sigma[:, None] ** 2))
        kernels = kernels / kernels.sum(dim=1, keepdim=True)
        identity = (offsets == 0).float().expand(batch, -1)
        kernels = torch.where(chosen[:, None], kernels, identity)  # unchosen images pass through unchanged
        weights = kernels.to(x.device, x.dtype).view(batch, 1, 1, 1, -1)
        # Separable, as shifted weighted sums: a grouped conv2d with one group per image and channel is
        # 10x slower on CPU than these few broadcast multiply-adds.
        padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
        size = 2 * radius + 1
        rows = padded[..., 0:width] * weights[..., 0]
        for j in range(1, size):
            rows = rows + padded[..., j:j + width] * weights[..., j]
        out = rows[..., 0:height, :] * weights[..., 0]
        for j in range(1, size):
            out = out + rows[..., j:j + height, :] * weights[..., j]
        return out


def _draw(batch: int, probability: float) -> torch.Tensor:
    """Which images of the batch get an augmentation applied with `probability` (bool [B])."""
    return torch.rand(batch) < probability


def _grey(x: torch.Tensor) -> torch.Tensor:
    r, g, b = _LUMA
    return (r * x[:, 0:1] + g * x[:, 1:2] + b * x[:, 2:3])
