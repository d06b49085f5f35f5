"""Where a site's local state (file index, patient-key salt) lives.

Not inside the data folder by default: hospital image shares are often read-only or shared with other
software. The default is a per-folder directory under `$VISIONFM_STATE_DIR` (or ~/.cache/visionfm),
named by a hash of the folder's absolute path; a site config may name its own.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

STATE_ENV = "VISIONFM_STATE_DIR"


def default_state_base() -> Path:
    """The folder holding every site's state directory."""
    configured = os.environ.get(STATE_ENV)
    if configured:
        return Path(configured)
    cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(cache) if cache else Path.home() / ".cache") / "visionfm" / "sites"


def site_state_dir(root: str | Path, state_dir: str | Path | None = None) -> Path:
    """The state directory of the data folder `root` (created on demand by the writers)."""
    if state_dir is not None:
        return Path(state_dir)
    digest = hashlib.sha256(str(Path(root).resolve()).encode("utf-8")).hexdigest()[:20]
    return default_state_base() / digest
