"""Image items: one labelled image that can be loaded on demand, from a file or from memory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from visionfm_core.data.files import read_any_image


@dataclass(frozen=True)
class ImageItem:
    """One image of a site. `source` is a file path or an in-memory name; it never leaves the site."""

    source: str
    label: int | None = None
    modality: str | None = None
    # Hashed, site-salted patient key used only for leakage-free splits (never logged or sent).
    patient_key: str | None = None
    frame: int | None = None
    # "R", "L", "B" (both) or "U" from DICOM tags; metadata only, kept on the site.
    laterality: str | None = None
    _array: np.ndarray | None = field(default=None, repr=False, compare=False)
    _loader: Callable[[ImageItem], np.ndarray] | None = field(default=None, repr=False, compare=False)

    def load(self) -> np.ndarray:
        """The image as (H, W, 3) uint8 (frame `frame` for a multi-frame DICOM); raises a DataError
        naming the file when it cannot be read."""
        if self._array is not None:
            return self._array
        if self._loader is not None:
            return self._loader(self)
        return read_any_image(self.source, self.frame)


def items_from_arrays(
    images: np.ndarray, labels: np.ndarray | None, name: str, modality: str | None = None
) -> list[ImageItem]:
    """Wrap an (N, H, W[, C]) uint8 array (MedMNIST layout) as in-memory items."""
    from visionfm_core.data.readers import to_rgb_uint8

    flat_labels = None if labels is None else np.asarray(labels).reshape(len(labels), -1)[:, 0]
    return [
        ImageItem(
            source=f"{name}[{i}]",
            label=None if flat_labels is None else int(flat_labels[i]),
            modality=modality,
            _array=to_rgb_uint8(images[i], f"{name}[{i}]"),
        )
        for i in range(len(images))
    ]
