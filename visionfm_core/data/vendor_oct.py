"""OCT exports in vendor formats (Topcon .fda/.fds, Heidelberg .e2e), read with `oct-converter`.

`oct-converter` (MIT, the optional extra ``visionfm-fed[oct]``) does the parsing; this module only
recognises the files by their first bytes, turns every B-scan of every volume into one frame and the
fundus photograph some exports carry into another, and gives each file's frames a group key (patient
or file, eye, visit) so a patient split never puts B-scans of one volume on both sides.

Frames: 0..N-1 are the B-scans of all volumes in file order; -1, -2, ... are the fundus images.
The reader parses the whole file (the formats have no separate header): indexing converts each
export once and keeps its decoded frames in the site's state area (`convert_export`), and a few
parsed exports stay in memory, so frames asked for one at a time do not parse the file again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import types
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from visionfm_core.data.problems import DataFileError, ProblemKind

logger = logging.getLogger(__name__)

VENDOR_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"FOCTFDA", "fda"),  # Topcon
    (b"FOCTFDS", "fds"),  # Topcon
    (b"E2EMultipleVolumeFile", "e2e"),  # Heidelberg Spectralis, several volumes
    (b"CMDb", "e2e"),  # Heidelberg Spectralis
)
VENDOR_NAMES = {"fda": "Topcon .fda", "fds": "Topcon .fds", "e2e": "Heidelberg .e2e"}
INSTALL_HINT = "install the OCT reader: pip install 'visionfm-fed[oct]' (oct-converter)"
CACHE_SIZE = 2  # decoded exports kept for the frames that follow (a real volume is ~100 MB)


def vendor_format(head: bytes) -> str | None:
    """"fda", "fds" or "e2e" when the first bytes are those of a vendor OCT export, else None."""
    return next((name for magic, name in VENDOR_MAGIC if head.startswith(magic)), None)


@dataclass(frozen=True)
class Volume:
    """One OCT volume of an export: its B-scans (2-D arrays) and the eye ("R", "L" or None)."""

    bscans: list[np.ndarray]
    laterality: str | None


@dataclass(frozen=True)
class VendorExport:
    """What an export holds. `patient_id` and `visit` stay on the site (they only feed group keys)."""

    volumes: list[Volume]
    fundus: list[tuple[np.ndarray, str | None]]
    patient_id: str | None
    visit: str | None

    @property
    def bscans(self) -> int:
        return sum(len(v.bscans) for v in self.volumes)


class _NumpyWithFromstring(types.ModuleType):
    """NumPy as oct-converter's Topcon readers expect it: they call `np.fromstring` on bytes, whose
    binary mode NumPy 2.3 removed; `frombuffer` (copied, so writable) is the same read."""

    def __init__(self) -> None:
        super().__init__("numpy")

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)

    @staticmethod
    def fromstring(data: Any, dtype: Any = float, count: int = -1, sep: str = "") -> np.ndarray:
        if sep:
            return np.fromstring(data, dtype=dtype, count=count, sep=sep)
        return np.frombuffer(data, dtype=dtype, count=count).copy()


def _numpy_lacks_binary_fromstring() -> bool:
    try:
        np.fromstring(b"\x00", dtype=np.uint8)  # type: ignore[call-overload]  # the removed mode
    except (ValueError, TypeError, AttributeError):
        return True
    return False


def _reader_class(fmt: str, path: str) -> Callable[[str], Any]:
    try:
        if fmt == "fda":
            from oct_converter.readers import fda as module
        elif fmt == "fds":
            from oct_converter.readers import fds as module  # type: ignore[no-redef]
        else:
            from oct_converter.readers import e2e as module  # type: ignore[no-redef]
    except ImportError as exc:
        # Also what a missing system library of OpenCV (libGL.so.1 on a bare server) looks like.
        detail = f" ({str(exc).splitlines()[0]})" if getattr(exc, "name", None) != "oct_converter" else ""
        raise DataFileError(
            path, ProblemKind.MISSING_CODEC, f"{VENDOR_NAMES[fmt]} export: {INSTALL_HINT}{detail}"
        ) from exc
    if _numpy_lacks_binary_fromstring() and not isinstance(module.np, _NumpyWithFromstring):
        module.np = _NumpyWithFromstring()  # only this reader module sees the shim
    reader: Callable[[str], Any] = getattr(module, fmt.upper())
    return reader


def _laterality(value: Any) -> str | None:
    text = str(value or "").strip().upper()[:1]
    return text if text in ("R", "L") else None


def _visit(value: Any) -> str | None:
    if value is None:
        return None
    return value.date().isoformat() if hasattr(value, "date") else str(value)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _parse(path: str, fmt: str) -> VendorExport:
    reader = _reader_class(fmt, path)(path)
    raw_volumes = _as_list(reader.read_oct_volume())
    volumes = [Volume([np.asarray(b) for b in v.volume], _laterality(v.laterality)) for v in raw_volumes]
    try:
        raw_fundus = _as_list(reader.read_fundus_image())
    except ValueError:  # "no fundus chunk": many exports hold B-scans only
        raw_fundus = []
    first = raw_volumes[0] if raw_volumes else None
    # A Topcon fundus photograph is of the scanned eye, which the export records with the volume.
    eye = volumes[0].laterality if volumes else None
    fundus = [(np.asarray(f.image), _laterality(f.laterality) or eye) for f in raw_fundus if f is not None]
    patient = getattr(first, "patient_id", None) or getattr(reader, "patient_id", None)
    return VendorExport(volumes, fundus, None if patient in (None, "") else str(patient),
                        _visit(getattr(first, "acquisition_date", None)))


_cache: OrderedDict[tuple[str, int, int], VendorExport] = OrderedDict()
_cache_lock = threading.Lock()


def read_export(path: str | Path, fmt: str) -> VendorExport:
    """Parse a vendor export (cached by path, size and modification time); a file the reader cannot
    parse (truncated, damaged, a format variant it does not know) is a DataFileError naming it."""
    name = str(path)
    try:
        stat = Path(path).stat()
    except FileNotFoundError as exc:
        raise DataFileError(name, ProblemKind.FILE_NOT_FOUND, "file not found") from exc
    key = (name, stat.st_size, stat.st_mtime_ns)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export = _parse(name, fmt)
    except DataFileError:
        raise
    except MemoryError as exc:
        raise DataFileError(name, ProblemKind.TOO_LARGE, f"{VENDOR_NAMES[fmt]} export too large to read") from exc
    except Exception as exc:  # the parser raises assorted types on damaged files; none may stop a site
        raise DataFileError(
            name, ProblemKind.CORRUPT,
            f"unreadable {VENDOR_NAMES[fmt]} export, damaged or truncated ({type(exc).__name__})",
        ) from exc
    if not export.bscans and not export.fundus:
        raise DataFileError(name, ProblemKind.MISSING_PIXEL_DATA, f"{VENDOR_NAMES[fmt]} export holds no image")
    with _cache_lock:
        _cache[key] = export
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return export


def _frame_key(export: VendorExport, frame: int | None) -> str:
    index = 0 if frame is None else frame
    if index < 0:
        if -index > len(export.fundus):
            raise IndexError(f"no fundus image {-index} in this export")
        return f"f{-index - 1}"
    if index >= export.bscans:
        raise IndexError(f"no B-scan {frame} in this export ({export.bscans})")
    return f"b{index}"


def _frames(export: VendorExport, name: str) -> dict[str, np.ndarray]:
    """Every frame as uint8, the way the readers hand them on (B-scans grey, fundus RGB)."""
    from visionfm_core.data.readers import to_rgb_uint8

    bscans = [b for volume in export.volumes for b in volume.bscans]
    frames = {f"b{i}": to_rgb_uint8(b, name)[..., 0] for i, b in enumerate(bscans)}
    frames.update({f"f{j}": to_rgb_uint8(image, name) for j, (image, _) in enumerate(export.fundus)})
    return frames


def frames_cache_path(path: str | Path) -> Path:
    """Where the decoded frames of this version of the file are kept (in the site's state area, never
    in the data folder): named by a hash of its absolute path, size and modification time."""
    from visionfm_core.data.state import default_state_base

    stat = Path(path).stat()
    identity = f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return default_state_base() / "vendor-oct" / f"{hashlib.sha256(identity.encode()).hexdigest()[:24]}.npz"


def convert_export(path: str | Path, fmt: str) -> VendorExport:
    """Parse an export and keep its frames decoded on disk, so that training, which asks for one
    B-scan at a time in random order, reads a small array instead of parsing the whole file again.
    A cache that cannot be written costs speed only."""
    export = read_export(path, fmt)
    try:
        target = frames_cache_path(path)
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".frames-", suffix=".npz", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as handle:
                    # Compressed members: one B-scan is still read alone; OCT speckle halves at least.
                    np.savez_compressed(handle, **_frames(export, str(path)))  # type: ignore[arg-type]
                os.replace(tmp, target)
            finally:
                Path(tmp).unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("could not keep decoded OCT frames (%s); they are parsed again when used", type(exc).__name__)
    return export


def read_vendor_frame(path: str | Path, fmt: str, frame: int | None) -> np.ndarray:
    """Frame `frame` of an export as (H, W, 3) uint8: a B-scan (0..N-1, default 0) or a fundus
    image (-1, -2, ...); from the decoded frames on disk when `convert_export` kept them."""
    from visionfm_core.data.readers import to_rgb_uint8

    name = str(path)
    try:
        cached = frames_cache_path(path)
        with np.load(cached, allow_pickle=False) as frames:
            index = 0 if frame is None else frame
            key = f"f{-index - 1}" if index < 0 else f"b{index}"
            if key in frames.files:
                return to_rgb_uint8(frames[key], name)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        pass  # not converted yet, or a damaged cache file: parse the export itself
    export = read_export(path, fmt)
    try:
        key = _frame_key(export, frame)
    except IndexError as exc:
        raise DataFileError(name, ProblemKind.OTHER, str(exc)) from exc
    return to_rgb_uint8(_frames_for(export, key), name)


def _frames_for(export: VendorExport, key: str) -> np.ndarray:
    index = int(key[1:])
    if key[0] == "f":
        return export.fundus[index][0]
    for volume in export.volumes:
        if index < len(volume.bscans):
            return volume.bscans[index]
        index -= len(volume.bscans)
    raise IndexError(key)


def sniff_vendor_file(path: str | Path) -> str:
    """The vendor format of a file already sniffed as FileType.VENDOR_OCT."""
    with open(path, "rb") as handle:
        fmt = vendor_format(handle.read(32))
    if fmt is None:
        raise DataFileError(str(path), ProblemKind.NOT_AN_IMAGE, "not a vendor OCT export")
    return fmt
