"""Patient keys and leakage-free splits.

A patient ID is replaced on arrival by an HMAC with a random per-site salt: the key groups one
patient's images for train/val/test splits, cannot be linked across sites, and the raw ID is never
stored, logged or sent. The salt lives in the site's local state folder and never leaves the site.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from visionfm_core.errors import ConfigError, DataError

if TYPE_CHECKING:  # annotations only (imported at run time it made a module cycle)
    from visionfm_core.data.items import ImageItem

SALT_FILE = "patient-salt"


def load_or_create_salt(state_dir: str | Path) -> bytes:
    """The site's salt from `state_dir`, created (32 random bytes, owner-only file) on first use."""
    path = Path(state_dir) / SALT_FILE
    if path.is_file():
        salt = path.read_bytes()
        if len(salt) < 16:
            raise DataError(
                str(path), "patient salt file is shorter than 16 bytes; delete it to make a new one"
            )
        return salt
    path.parent.mkdir(parents=True, exist_ok=True)
    salt = secrets.token_bytes(32)
    # O_EXCL: two processes starting at once must not end up with different salts.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    with os.fdopen(fd, "wb") as handle:
        handle.write(salt)
    return salt


def hash_patient_id(patient_id: str, salt: bytes) -> str | None:
    """A 24-hex-digit site-salted key for a patient ID; None for an empty ID."""
    cleaned = patient_id.strip()
    if not cleaned:
        return None
    return hmac.new(salt, cleaned.encode("utf-8"), hashlib.sha256).hexdigest()[:24]


def group_key(item: ImageItem) -> str:
    """The unit that must not be split: the patient, else the file (all B-scans of one volume)."""
    return item.patient_key if item.patient_key is not None else f"file:{item.source}"


def split_by_patient(
    items: Sequence[ImageItem], fractions: Mapping[str, float], seed: int = 0
) -> dict[str, list[ImageItem]]:
    """Split items into named parts of about the given fractions (by image count), never putting one
    patient (or one file's frames) in two parts. Deterministic for a given seed and salt."""
    if not fractions or any(f < 0 for f in fractions.values()) or sum(fractions.values()) <= 0:
        raise ConfigError(
            "fractions", f"need non-negative fractions with a positive sum, got {dict(fractions)}"
        )
    total = sum(fractions.values())
    groups: dict[str, list[ImageItem]] = {}
    for item in items:
        groups.setdefault(group_key(item), []).append(item)
    # Order groups by a seeded hash: a random but reproducible shuffle independent of file order.
    order = sorted(groups, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    names = list(fractions)
    targets = [fractions[n] / total * len(items) for n in names]
    parts: dict[str, list[ImageItem]] = {n: [] for n in names}
    for key in order:
        # Give the group to the part furthest below its target (relative), so sizes track fractions.
        deficits = [(targets[i] - len(parts[n])) / max(targets[i], 1e-9) for i, n in enumerate(names)]
        best = max(range(len(names)), key=lambda i: (deficits[i] if targets[i] > 0 else -1e18, -i))
        parts[names[best]].extend(groups[key])
    return parts
