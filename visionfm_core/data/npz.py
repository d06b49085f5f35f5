"""Read one array from a .npz file after checking its declared size, so a hostile or corrupt file
(a zip bomb, a header promising terabytes) is refused before any memory is spent on it."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from visionfm_core.data.problems import DataFileError, ProblemKind

# Far above a MedMNIST-224 split (about 240 MB) yet far below this class of machine's memory.
MAX_ARRAY_BYTES = 8 * 1024**3
# Images compress a few times at most; a far higher ratio means a zip bomb of zeros.
MAX_COMPRESSION_RATIO = 200
_SMALL = 64 * 1024**2


def npz_keys(path: str | Path) -> list[str]:
    """Array names in the archive (without the .npy suffix)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
    except FileNotFoundError as exc:
        raise DataFileError(str(path), ProblemKind.FILE_NOT_FOUND, "file not found") from exc
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DataFileError(
            str(path), ProblemKind.CORRUPT, f"not a readable .npz file ({type(exc).__name__})"
        ) from exc


def read_npz_array(path: str | Path, key: str) -> np.ndarray:
    """The array `key` of an .npz file; raises DataFileError naming the file on any problem."""
    name = str(path)
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(f"{key}.npy")
            if info.file_size > _SMALL and info.file_size > MAX_COMPRESSION_RATIO * max(
                info.compress_size, 1
            ):
                raise DataFileError(name, ProblemKind.TOO_LARGE, f"array '{key}' is a decompression bomb")
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(member)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(member)
                else:
                    raise DataFileError(
                        name, ProblemKind.CORRUPT, f"array '{key}' has an unsupported .npy version"
                    )
                if dtype.hasobject:
                    raise DataFileError(
                        name,
                        ProblemKind.UNSUPPORTED_PIXEL_FORMAT,
                        f"array '{key}' holds Python objects (refused: unsafe to unpickle)",
                    )
                declared = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
                if declared > MAX_ARRAY_BYTES:
                    raise DataFileError(
                        name, ProblemKind.TOO_LARGE, f"array '{key}' declares {declared} bytes"
                    )
                if declared > info.file_size:
                    raise DataFileError(
                        name, ProblemKind.TRUNCATED, f"array '{key}' is shorter than its header says"
                    )
            with archive.open(info) as member:
                array = np.lib.format.read_array(member, allow_pickle=False)
    except DataFileError:
        raise
    except KeyError as exc:
        raise DataFileError(name, ProblemKind.OTHER, f"no '{key}' array in the file") from exc
    except FileNotFoundError as exc:
        raise DataFileError(name, ProblemKind.FILE_NOT_FOUND, "file not found") from exc
    except Exception as exc:  # zipfile, zlib and numpy raise many types on corrupt archives
        raise DataFileError(
            name, ProblemKind.CORRUPT, f"not a readable .npz file ({type(exc).__name__})"
        ) from exc
    return np.asarray(array)
