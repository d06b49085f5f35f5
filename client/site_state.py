"""Where a site keeps what must survive between rounds but never leaves it: the SSL teacher, centres
and optimizer moments, and personal fine-tuning heads.

In a simulation that is Flower's in-memory `context.state`. In deployment (`state-dir` in the node
config, which `visionfm-client join` sets) it is safetensors files on the site's own disk, one per
run and name: at ViT-S scale the SSL state is about 270 MB per modality, and Flower pushes a node's
`context.state` back to the SuperNode after every message under a short deadline, which such a
payload misses (observed: every later message of the run failed).

A run's folder is only read by that run (Flower gives every run, a resubmission too, a new id), so when
a run starts writing, folders of other runs untouched for `state-keep-hours` (node config, default 72)
are deleted: at ViT-S a run leaves about 270 MB per modality behind. Recently written folders stay, as
a SuperNode may serve more than one run at a time.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from client.node_keys import KEEP_HOURS_KEY, STATE_DIR_KEY  # node-config keys (join sets them)
from strategies.protocol.records import arrays_to_record, record_to_tensors
from visionfm_core.models.checkpoint import atomic_write_bytes

DEFAULT_KEEP_HOURS = 72.0
logger = logging.getLogger(__name__)
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


class SiteStateStore:
    """Named tensor dicts kept on the site between rounds (see the module docstring)."""

    def __init__(self, context: Any) -> None:
        self._context = context
        folder = context.node_config.get(STATE_DIR_KEY)
        self.folder = Path(str(folder)) / f"run-{int(context.run_id)}" if folder else None
        self.keep_hours = float(context.node_config.get(KEEP_HOURS_KEY, DEFAULT_KEEP_HOURS))

    def load(self, name: str) -> dict[str, torch.Tensor] | None:
        """The tensors saved under `name` in this run, or None."""
        if self.folder is None:
            record = self._context.state.array_records.get(name)
            return None if record is None else record_to_tensors(record)
        path = self._path(name)
        return load_file(str(path)) if path.is_file() else None

    def save(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Keep `tensors` under `name` (replacing what was there); files are private to the site (0600)."""
        if self.folder is None:
            self._context.state[name] = arrays_to_record(tensors)
            return
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            prune_idle_runs(self.folder.parent, keep=self.folder, idle_hours=self.keep_hours)
        path = self._path(name)
        contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        atomic_write_bytes(path, lambda tmp: save_file(contiguous, str(tmp)))
        os.chmod(path, 0o600)

    def names(self, prefix: str) -> list[str]:
        """Every saved name that starts with `prefix`."""
        if self.folder is None:
            return [k for k in self._context.state.array_records if k.startswith(prefix)]
        if not self.folder.is_dir():
            return []
        saved = [_unescape(p.stem) for p in self.folder.glob("*.safetensors")]
        return sorted(n for n in saved if n.startswith(prefix))

    def load_all(self, prefix: str) -> dict[str, dict[str, torch.Tensor]]:
        """Every saved tensor dict whose name starts with `prefix`, keyed by the rest of its name."""
        loaded = {name[len(prefix):]: self.load(name) for name in self.names(prefix)}
        return {key: tensors for key, tensors in loaded.items() if tensors is not None}

    def _path(self, name: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{_escape(name)}.safetensors"


def prune_idle_runs(root: Path, keep: Path, idle_hours: float) -> list[Path]:
    """Delete the `run-*` folders under `root` (except `keep`) in which nothing was written for
    `idle_hours`; returns the folders deleted."""
    cutoff = time.time() - idle_hours * 3600.0
    deleted = []
    for folder in root.glob("run-*"):
        if folder == keep or not folder.is_dir():
            continue
        newest = max((p.stat().st_mtime for p in folder.rglob("*")), default=folder.stat().st_mtime)
        if newest < cutoff:
            shutil.rmtree(folder, ignore_errors=True)
            deleted.append(folder)
    if deleted:
        logger.info("deleted the between-round state of %d earlier run(s), idle for over %.0f h",
                    len(deleted), idle_hours)
    return deleted


def _escape(name: str) -> str:
    # Names hold "/" ("local-ssl-state/fundus"); keep file names flat and reversible.
    return _SAFE_NAME.sub(lambda m: f"~{ord(m.group()):02x}", name)  # "~" itself is escaped too


def _unescape(stem: str) -> str:
    return re.sub(r"~([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), stem)
