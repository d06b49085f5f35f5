"""The real, openly licensed eye images bundled with the package (see simulations/data/ATTRIBUTION.md)
and how a simulation uses each: a pool that is partitioned between simulated sites, and a held-out
labelled test split that every mode (federated, centralized, local) is scored on."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from strategies.protocol.bundled_data import DATA_DIR
from strategies.protocol.task_sets import held_out_sources
from visionfm_core.data.files import read_any_image
from visionfm_core.data.items import ImageItem
from visionfm_core.data.sources import load_npz_split, scan_image_folder
from visionfm_core.errors import ConfigError
from visionfm_core.splits import split_train_val

BUNDLED_SALT = b"visionfm-fed bundled public data"


@dataclass(frozen=True)
class SimulationDataset:
    """A labelled dataset of one modality: `pool` is shared out to sites, `test` is never trained on."""

    name: str
    modality: str
    pool: list[ImageItem]
    test: list[ImageItem]
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _retinamnist() -> SimulationDataset:
    path = DATA_DIR / "retinamnist" / "retinamnist.npz"
    train = load_npz_split(path, "train", modality="fundus")
    test = load_npz_split(path, "test", modality="fundus")
    names = ["DR grade 0", "DR grade 1", "DR grade 2", "DR grade 3", "DR grade 4"]
    return SimulationDataset("retinamnist", "fundus", train.items, test.items, names)


def _oct2017() -> SimulationDataset:
    root = DATA_DIR / "oct2017_val"
    # A fixed salt for this public, already de-identified set: with a site's random salt the patient keys,
    # hence the held-out patients, would differ from one checkout or machine to the next.
    scan = scan_image_folder(root, labels_csv=root / "labels.csv", modality="oct", salt=BUNDLED_SALT)
    items = scan.items
    # Hold out a quarter of the patients as the test split, so no patient is both trained and scored on.
    pool_idx, test_idx = split_train_val(len(items), 0.25, seed=2017, groups=[i.patient_key for i in items])
    return SimulationDataset("oct2017", "oct", [items[i] for i in pool_idx], [items[i] for i in test_idx],
                             scan.class_names)


@functools.lru_cache(maxsize=96)
def _decoded(path: str) -> np.ndarray:
    """A bundled photograph decoded once per process (read-only): an SSL round draws every view of a
    batch from a dozen photographs, again and again, and a 2-megapixel JPEG takes ~16 ms to decode."""
    image = read_any_image(path)
    image.flags.writeable = False
    return image


def _cached_load(item: ImageItem) -> np.ndarray:
    return _decoded(item.source)


def _fundus_photos() -> SimulationDataset:
    """The bundled high-resolution fundus photographs (HRF 1752x1168, IDRiD 1072x712) as unlabelled
    pretraining images, without any photograph that a bundled task set holds out for its test split:
    the encoder the tasks fine-tune never saw the photographs they are scored on."""
    held_out = held_out_sources("fundus")
    photos = [*sorted((DATA_DIR / "hrf" / "images").glob("*.jpg")),
              *sorted((DATA_DIR / "idrid_seg" / "images").glob("*.jpg"))]
    # One photograph per person in both sets, so the file name is the patient key.
    items = [ImageItem(str(path), modality="fundus", patient_key=path.stem, _loader=_cached_load)
             for path in photos if str(path) not in held_out]
    return SimulationDataset("fundus-photos", "fundus", items, [], [])



BUNDLED = {"retinamnist": _retinamnist, "oct2017": _oct2017, "fundus-photos": _fundus_photos}
TEST_FOLDER = "test"


def folder_dataset(root: Path, modality: str = "fundus") -> SimulationDataset:
    """A folder of images as a simulation dataset: the images under `<root>/test/` are the held-out test
    split (never trained on), every other image is the pool shared out to sites. Labels come from
    `<root>/labels.csv` (paths relative to `root`) when it exists, as for a site's folder."""
    labels = root / "labels.csv"
    scan = scan_image_folder(root, labels_csv=labels if labels.is_file() else None, modality=modality,
                             salt=BUNDLED_SALT)
    test_dir = (root / TEST_FOLDER).resolve()
    is_test = [test_dir in Path(item.source).resolve().parents for item in scan.items]
    pool = [item for item, held in zip(scan.items, is_test, strict=True) if not held]
    if len(pool) < 2:
        raise ConfigError("datasets", f"folder {root} has {len(pool)} image(s) outside {TEST_FOLDER}/; need 2+")
    test = [item for item, held in zip(scan.items, is_test, strict=True) if held]
    return SimulationDataset(root.name, modality, pool, test, scan.class_names or ["unlabelled"])


@functools.cache
def load_dataset(name: str, modality: str = "fundus") -> SimulationDataset:
    """A bundled dataset by name, or a folder of `modality` images by path (see :func:`folder_dataset`);
    cached per process: simulated sites in one worker share it."""
    if name not in BUNDLED and ("/" in name or name.startswith(".")):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise ConfigError("datasets", f"dataset folder {name!r} not found (or not a directory)")
        return folder_dataset(folder, modality)
    try:
        factory = BUNDLED[name]
    except KeyError:
        raise ConfigError("datasets", f"unknown bundled dataset {name!r}; known: {', '.join(BUNDLED)}, "
                                      "or a folder path") from None
    return factory()
