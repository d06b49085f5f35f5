"""Benchmark: indexing a DICOM site from headers only vs a naive full read, and decoding images/s.

Builds a synthetic site in a temporary folder from the bundled real images (ophthalmic photographs as
JPEG Baseline DICOM, OCT volumes as multi-frame uncompressed OPT), then measures in one run:

  naive        pydicom.dcmread + pixel_array of every file (what a script without an index does)
  index cold   visionfm's header-only index (stop_before_pixels), first build
  index warm   the same index refreshed with nothing changed (what every later round costs)
  decode       images/s through a DataLoader, in-process and with worker processes

and prints each as files/s or images/s with the ratio against the naive baseline of the same run.
Usage: python bench/bench_data_index.py [--files 1000] [--workers 2]
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import torch
from _bench import add_smoke_flag, print_cpu
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

import simulations
from visionfm_core.data.index import index_site
from visionfm_core.data.loading import measure_decode_rate
from visionfm_core.data.site import open_site

DATA = Path(simulations.__file__).parent / "data"
OP = UID("1.2.840.10008.5.1.4.1.1.77.1.5.1")
OPT = UID("1.2.840.10008.5.1.4.1.1.77.1.5.4")


def _dataset(sop_class: UID, modality: str, syntax: UID, patient: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.preamble = b"\0" * 128
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.ImageLaterality = modality, patient, "R"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    return ds


def build_site(root: Path, files: int, oct_every: int = 10) -> int:
    """Write `files` DICOM files (every `oct_every`-th an OCT volume); returns the number of frames."""
    photos = sorted((DATA / "hrf" / "images").glob("*.jpg"))
    scans = sorted((DATA / "oct2017_val" / "val").rglob("*.jpeg"))[:16]
    volume = np.stack([np.asarray(Image.open(s).convert("L").resize((256, 248))) for s in scans])
    jpegs = []
    for photo in photos[:8]:
        buffer = io.BytesIO()
        Image.open(photo).convert("RGB").resize((768, 512)).save(buffer, "JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    frames = 0
    for n in range(files):
        folder = root / f"patient{n % 97:03d}" / f"study{n % 5}"
        folder.mkdir(parents=True, exist_ok=True)
        if n % oct_every == 0:
            ds = _dataset(OPT, "OPT", ExplicitVRLittleEndian, f"P{n % 97}")
            ds.Rows, ds.Columns, ds.NumberOfFrames = 248, 256, len(volume)
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.PixelData = volume.tobytes()
            frames += len(volume)
        else:
            ds = _dataset(OP, "OP", JPEGBaseline8Bit, f"P{n % 97}")
            ds.Rows, ds.Columns, ds.SamplesPerPixel = 512, 768, 3
            ds.PhotometricInterpretation, ds.PlanarConfiguration = "YBR_FULL_422", 0
            ds.PixelData = encapsulate([jpegs[n % len(jpegs)]])
            ds["PixelData"].VR = "OB"
            frames += 1
        ds.save_as(folder / f"IM{n:06d}", enforce_file_format=True)
    return frames


def naive_full_read(root: Path) -> tuple[int, int, float]:
    """(files, frames, seconds) for dcmread + pixel_array of every file."""
    started = time.perf_counter()
    files = frames = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            array = pydicom.dcmread(path).pixel_array
            files += 1
            multi_frame = (array.ndim == 3 and array.shape[-1] != 3) or array.ndim == 4
            frames += array.shape[0] if multi_frame else 1
    return files, frames, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    add_smoke_flag(parser)
    args = parser.parse_args()
    if args.smoke:
        args.files, args.workers = 12, 1
    print_cpu()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="visionfm-bench-"))
    try:
        site, state = work / "site", work / "state"
        total_frames = build_site(site, args.files)
        size_mb = sum(p.stat().st_size for p in site.rglob("*") if p.is_file()) / 1e6
        print(f"site: {args.files} DICOM files, {total_frames} frames, {size_mb:.0f} MB (page cache warm)")

        cold = index_site(site, state, salt=b"b" * 32)
        warm = index_site(site, state, salt=b"b" * 32)
        files, frames, naive_s = naive_full_read(site)
        naive_rate = files / naive_s
        cold_rate = cold.stats.files / cold.stats.seconds
        warm_rate = warm.stats.files / warm.stats.seconds
        print(f"naive dcmread+pixel_array: {naive_rate:9.1f} files/s  ({naive_s:.2f} s, {frames} frames)")
        for label, files_per_s in (
            ("index, first build:      ", cold_rate),
            ("index, refresh unchanged:", warm_rate),
        ):
            print(f"{label}  {files_per_s:9.1f} files/s  ratio vs naive {files_per_s / naive_rate:6.1f}x")
        print(
            f"projected first index of 100,000 such files: {100_000 / cold_rate / 60:.1f} min; "
            f"refresh: {100_000 / warm_rate:.1f} s"
        )

        items = open_site(site, state_dir=state).items
        naive_images = frames / naive_s
        print(f"naive decode:              {naive_images:9.1f} images/s")
        for workers in sorted({0, args.workers}):
            rate = measure_decode_rate(items, num_workers=workers, batch_size=16)
            print(
                f"decode, {workers} worker(s):        {rate.images_per_second:9.1f} images/s  "
                f"ratio vs naive {rate.images_per_second / naive_images:6.2f}x ({rate.images} images)"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
