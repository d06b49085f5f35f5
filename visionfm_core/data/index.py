"""A persisted index of a site's image files, built from headers only and refreshed incrementally.

Each file is classified by content (image, DICOM, or a problem with its kind and reason); DICOM files
are read with `stop_before_pixels`, images by their header. The index is saved as JSON in the site's
state directory; a refresh re-reads only files whose size or modification time changed (and files
that lacked a codec, in case one was installed since), so later rounds do not rescan the site.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from visionfm_core.data.confine import OUTSIDE_REASON, escapes, is_inside, real_path
from visionfm_core.data.dicom_header import read_dicom_header
from visionfm_core.data.problems import DataFileError, ProblemKind
from visionfm_core.data.readers import MAX_PIXELS
from visionfm_core.data.sniff import SIDECAR_SUFFIXES, FileType, sniff_file
from visionfm_core.errors import DataError

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
INDEX_VERSION = 2  # 2: vendor OCT exports (files that version 1 listed as problems are re-read)


@dataclass
class IndexEntry:
    """One file of the site. `kind` is "image", "dicom" or "problem"; a problem has `problem` (a
    ProblemKind value) and a one-line `reason`. `patient_key` is already salted and hashed."""

    path: str
    size: int
    mtime_ns: int
    kind: str
    problem: str | None = None
    reason: str | None = None
    width: int = 0
    height: int = 0
    frames: int = 1
    modality: str | None = None
    laterality: str | None = None
    patient_key: str | None = None
    # Vendor OCT exports ("vendor_oct"): the format, each volume as [B-scans, eye, group key] and each
    # fundus image as [eye, group key] (group: salted hash of patient or file, eye and visit).
    vendor: str | None = None
    volumes: list[list[Any]] | None = None
    fundus: list[list[Any]] | None = None


@dataclass
class IndexStats:
    """What one build or refresh did."""

    files: int = 0
    read: int = 0
    reused: int = 0
    removed: int = 0
    seconds: float = 0.0


@dataclass
class SiteIndex:
    """Every indexed file of a data folder, keyed by path relative to the folder (POSIX form)."""

    root: Path
    entries: dict[str, IndexEntry] = field(default_factory=dict)
    stats: IndexStats = field(default_factory=IndexStats)

    def usable(self) -> list[IndexEntry]:
        """Image and DICOM entries, in path order."""
        return [e for _, e in sorted(self.entries.items()) if e.kind != "problem"]

    def problems(self) -> list[IndexEntry]:
        """Entries that cannot be used, in path order."""
        return [e for _, e in sorted(self.entries.items()) if e.kind == "problem"]


def iter_site_files(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(relative POSIX path, stat) of every candidate file below `root`: hidden files and folders,
    sidecar files (CSV, text, ...) and symlinked folders (loops) are left out. A link to a file
    outside `root` is listed with the link's own stat (its target is never touched) and becomes a
    problem entry in `index_file`."""
    real_root = real_path(root)
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            logger.warning("cannot list folder %s: %s", folder, type(exc).__name__)
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_symlink() and not is_inside(entry.path, [real_root]):
                    if Path(entry.name).suffix.lower() not in SIDECAR_SUFFIXES:
                        yield Path(entry.path).relative_to(root).as_posix(), entry.stat(follow_symlinks=False)
                elif entry.is_file():
                    if Path(entry.name).suffix.lower() in SIDECAR_SUFFIXES:
                        continue
                    rel = Path(entry.path).relative_to(root).as_posix()
                    yield rel, entry.stat()
            except OSError:
                continue


def _problem(rel: str, stat: os.stat_result, error: DataError) -> IndexEntry:
    kind = error.kind if isinstance(error, DataFileError) else ProblemKind.OTHER
    return IndexEntry(rel, stat.st_size, stat.st_mtime_ns, "problem", problem=kind.value, reason=error.reason)


def _image_entry(path: Path, rel: str, stat: os.stat_result) -> IndexEntry:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataFileError(
            str(path), ProblemKind.TOO_LARGE, "image too large (decompression bomb guard)"
        ) from exc
    except Exception as exc:  # Pillow raises assorted types on bad headers; every one means "skip the file".
        raise DataFileError(
            str(path), ProblemKind.CORRUPT, f"unreadable image header ({type(exc).__name__})"
        ) from exc
    if width * height > MAX_PIXELS:
        raise DataFileError(str(path), ProblemKind.TOO_LARGE, f"image too large ({width}x{height} pixels)")
    return IndexEntry(rel, stat.st_size, stat.st_mtime_ns, "image", width=width, height=height)


def vendor_entry(path: Path, rel: str, stat: os.stat_result, salt: bytes | None) -> IndexEntry:
    """The index entry of a vendor OCT export: its volumes, fundus images and their group keys."""
    from visionfm_core.data.patients import hash_patient_id
    from visionfm_core.data.vendor_oct import convert_export, sniff_vendor_file

    fmt = sniff_vendor_file(path)
    export = convert_export(path, fmt)

    def group(eye: str | None) -> str | None:
        # One group per eye and visit, so a patient split keeps a volume's B-scans (and the fundus
        # photograph taken with them) together; the raw ID and date never leave this function.
        owner = f"patient:{export.patient_id}" if export.patient_id else f"file:{rel}"
        return None if salt is None else hash_patient_id(f"{owner}|eye:{eye or '?'}|visit:{export.visit or '?'}", salt)

    volumes = [[len(v.bscans), v.laterality, group(v.laterality)] for v in export.volumes if v.bscans]
    fundus = [[eye, group(eye)] for _, eye in export.fundus]
    first = export.volumes[0].bscans[0] if export.bscans else export.fundus[0][0]
    return IndexEntry(
        rel, stat.st_size, stat.st_mtime_ns, "vendor_oct", width=int(first.shape[1]), height=int(first.shape[0]),
        frames=export.bscans, modality="oct" if export.bscans else "fundus",
        laterality=export.volumes[0].laterality if export.volumes else None, vendor=fmt, volumes=volumes, fundus=fundus,
    )


def index_file(root: Path, rel: str, stat: os.stat_result, salt: bytes | None) -> IndexEntry:
    """Classify and describe one file from its header; a bad file becomes a "problem" entry."""
    path = root / rel
    try:
        if escapes(root, rel):  # checked before anything is opened
            raise DataFileError(str(path), ProblemKind.OUTSIDE_DATA_FOLDER, OUTSIDE_REASON)
        if stat.st_size == 0:
            raise DataFileError(str(path), ProblemKind.EMPTY, "empty file (0 bytes)")
        kind = sniff_file(path)
        if kind is FileType.IMAGE:
            return _image_entry(path, rel, stat)
        if kind is FileType.DICOM:
            header = read_dicom_header(path, salt)
            return IndexEntry(
                rel,
                stat.st_size,
                stat.st_mtime_ns,
                "dicom",
                width=header.columns,
                height=header.rows,
                frames=header.frames,
                modality=header.modality,
                laterality=header.laterality,
                patient_key=header.patient_key,
            )
        if kind is FileType.VENDOR_OCT:
            return vendor_entry(path, rel, stat, salt)
        suffix = Path(rel).suffix or "(none)"
        raise DataFileError(
            str(path),
            ProblemKind.NOT_AN_IMAGE,
            f"content is neither a supported image, DICOM nor a vendor OCT export (extension {suffix})",
        )
    except DataError as exc:
        return _problem(rel, stat, exc)
    except OSError as exc:
        return _problem(
            rel, stat, DataFileError(str(path), ProblemKind.OTHER, f"cannot read file ({type(exc).__name__})")
        )


def _salt_tag(salt: bytes | None) -> str:
    return "" if salt is None else hashlib.sha256(b"visionfm-index:" + salt).hexdigest()[:16]


def load_index(index_path: Path, root: Path, salt: bytes | None) -> SiteIndex:
    """A saved index, or an empty one when missing, unreadable, of another version, or made with another
    salt (its patient keys would not match)."""
    index = SiteIndex(root=root)
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
        if data.get("version") != INDEX_VERSION or data.get("salt_tag") != _salt_tag(salt):
            return index
        index.entries = {e["path"]: IndexEntry(**e) for e in data["entries"]}
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring unreadable index %s (%s); rebuilding", index_path, type(exc).__name__)
        index.entries = {}
    return index


def save_index(index: SiteIndex, index_path: Path, salt: bytes | None) -> None:
    """Write atomically (temp file + rename) so a crash never leaves a half-written index."""
    index_path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "version": INDEX_VERSION,
        "salt_tag": _salt_tag(salt),
        "entries": [asdict(e) for _, e in sorted(index.entries.items())],
    }
    fd, tmp = tempfile.mkstemp(prefix=".index-", suffix=".json", dir=index_path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, separators=(",", ":"))
        os.replace(tmp, index_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _needs_reading(old: IndexEntry | None, stat: os.stat_result) -> bool:
    if old is None or old.size != stat.st_size or old.mtime_ns != stat.st_mtime_ns:
        return True
    # A codec may have been installed since: retry those files.
    return old.problem == ProblemKind.MISSING_CODEC.value


def refresh_index(index: SiteIndex, salt: bytes | None) -> SiteIndex:
    """Bring `index` up to date with the files on disk, re-reading only new or changed files."""
    started = time.perf_counter()
    stats = IndexStats()
    fresh: dict[str, IndexEntry] = {}
    for rel, stat in iter_site_files(index.root):
        old = index.entries.get(rel)
        if _needs_reading(old, stat):
            fresh[rel] = index_file(index.root, rel, stat, salt)
            stats.read += 1
        else:
            assert old is not None
            fresh[rel] = old
            stats.reused += 1
    stats.files = len(fresh)
    stats.removed = len(set(index.entries) - set(fresh))
    stats.seconds = time.perf_counter() - started
    return SiteIndex(root=index.root, entries=fresh, stats=stats)


def index_site(root: str | Path, state_dir: str | Path, salt: bytes | None = None) -> SiteIndex:
    """Load the saved index of `root` from `state_dir`, refresh it, and save it when anything changed."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(str(root), "data folder not found or not a directory")
    index_path = Path(state_dir) / INDEX_FILE
    index = refresh_index(load_index(index_path, root, salt), salt)
    if index.stats.read or index.stats.removed or not index_path.exists():
        try:
            save_index(index, index_path, salt)
        except OSError as exc:
            # A read-only state folder costs speed on the next run, not correctness.
            logger.warning("could not save the file index to %s (%s)", index_path, type(exc).__name__)
    return index
