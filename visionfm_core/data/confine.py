"""Keep a site's reads inside the folders it was given: symbolic links and `..` are resolved first.

A hospital's data folder (or a task manifest) may contain a link to anything on the machine
(`/etc/passwd`, another department's share); every file is therefore resolved to its real path and
refused, by name, when that path is not inside an allowed folder. Nothing outside is opened.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

OUTSIDE_REASON = "resolves (through a symbolic link or '..') to a file outside the data folder: refused"


def real_path(path: str | Path) -> str:
    """`path` with every symbolic link and `..` resolved (the file need not exist)."""
    return os.path.realpath(path)


def is_inside(path: str | Path, roots: Iterable[str | Path]) -> bool:
    """True when the real path of `path` lies inside the real path of one of `roots`."""
    target = real_path(path)
    for root in roots:
        base = real_path(root)
        if target == base or target.startswith(base.rstrip(os.sep) + os.sep):
            return True
    return False


def escapes(root: str | Path, rel: str) -> bool:
    """True when `root/rel` is (or passes through) a link that leads outside `root`."""
    return not is_inside(Path(root) / rel, [root])
