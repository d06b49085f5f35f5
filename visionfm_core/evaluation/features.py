"""Frozen-feature extraction: the [CLS] embedding of an encoder for every image of a dataset."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from visionfm_core.data.datasets import ImageDataset
from visionfm_core.data.items import ImageItem
from visionfm_core.runtime import autocast_for


@torch.inference_mode()
def extract_features(
    encoder: nn.Module,
    items: Sequence[ImageItem],
    transform: Callable[[np.ndarray], torch.Tensor],
    device: torch.device | str = "cpu",
    batch_size: int = 128,
    num_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, D] float32, labels [N] int64) with the encoder in eval mode."""
    device = torch.device(device)
    was_training = encoder.training
    encoder.eval()
    loader = DataLoader(ImageDataset(items, transform), batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    features, labels = [], []
    for images, targets in loader:
        with autocast_for(device):
            out = encoder(images.to(device, non_blocking=True))
        features.append(out.float().cpu().numpy())
        labels.append(targets.numpy())
    encoder.train(was_training)
    return np.concatenate(features).astype(np.float32), np.concatenate(labels).astype(np.int64)
