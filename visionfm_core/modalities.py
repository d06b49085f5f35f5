"""The eight VisionFM imaging modalities: one canonical name each, aliases, normalisation, image size.

Mean and std are VisionFM's own per-modality values (RGB order). Upstream spells slit lamp and
ultrasound differently in different files; here every spelling resolves to one canonical name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from visionfm_core.errors import UnknownModalityError


@dataclass(frozen=True)
class Modality:
    """One imaging modality and how its images are normalised."""

    name: str
    title: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_image_size: int = 224
    grayscale: bool = False
    aliases: tuple[str, ...] = ()
    # Inputs take the images' own aspect ratio (OCT B-scans are wide rectangles; a fundus photograph's
    # field of view is round, so it stays square).
    native_aspect: bool = False
    # The input's width / height when a federation says `auto`: no site may send statistics of its
    # images, so the aspect cannot be measured there as `visionfm finetune` does; it is fixed per
    # modality (see visionfm_core/tasks/aspect.py) and a coordinator sets W:H for other scanners.
    federated_aspect: float = 1.0


def _grey(value: float) -> tuple[float, float, float]:
    return (value, value, value)


MODALITIES: dict[str, Modality] = {
    m.name: m
    for m in (
        Modality("fundus", "Fundus photography", (0.4237, 0.2609, 0.1284), (0.2948, 0.2017, 0.1367),
                 aliases=("cfp", "colour_fundus", "color_fundus", "fundus_photo", "op")),
        Modality("oct", "Optical coherence tomography", _grey(0.2109), _grey(0.1760), grayscale=True,
                 aliases=("opt", "oct_bscan", "b_scan_oct"), native_aspect=True, federated_aspect=2.0),
        Modality("ffa", "Fundus fluorescein angiography", (0.2020, 0.2021, 0.2020), (0.1741, 0.1740, 0.1740),
                 grayscale=True, aliases=("fa", "fluorescein_angiography")),
        Modality("slit_lamp", "Slit-lamp photography", (0.5557, 0.4029, 0.3886), (0.2652, 0.2331, 0.2390),
                 aliases=("slitlamp", "slit", "slip_lamp")),
        Modality("ubm", "Ultrasound biomicroscopy", _grey(0.0961), _grey(0.2098), grayscale=True,
                 aliases=("ultrasound_biomicroscopy",)),
        Modality("ultrasound", "B-scan ultrasound", (0.0599, 0.0598, 0.0567), (0.1543, 0.1550, 0.1446),
                 grayscale=True, aliases=("us", "b_scan", "bscan", "ultrasonic", "ultrasound_b_scan")),
        Modality("external_eye", "External eye photography", (0.4936, 0.3632, 0.2596),
                 (0.3200, 0.2711, 0.2199), aliases=("external", "externaleye", "eye_photo")),
        Modality("mri", "Magnetic resonance imaging", _grey(0.1737), _grey(0.1620), grayscale=True,
                 aliases=("mr",)),
    )
}

_ALIASES: dict[str, str] = {}
for _m in MODALITIES.values():
    _ALIASES[_m.name] = _m.name
    for _alias in _m.aliases:
        _ALIASES[_alias] = _m.name


def _normalise_key(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def get_modality(name: str) -> Modality:
    """Resolve a canonical name or alias (case, spaces and dashes ignored) to its Modality."""
    key = _normalise_key(name)
    canonical = _ALIASES.get(key) or _ALIASES.get(key.replace("_", ""))
    if canonical is None:
        raise UnknownModalityError(name, sorted(MODALITIES))
    return MODALITIES[canonical]


def canonical_modality(name: str) -> str:
    """The canonical name of a modality given any accepted spelling."""
    return get_modality(name).name
