"""`visionfm-client check`: is this site ready to join? Data, hardware, certificates, coordinator.

Every check yields one line with a verdict: `ok`, `warn` (works, but look at it) or `fail` (joining
would not work). File names of unreadable images are shown on the local console only.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from certs.bundle import load_bundle
from certs.errors import CertificateError
from certs.verify import verify_bundle
from client.uplink import probe_coordinator
from visionfm_core.data.problems import ProblemKind
from visionfm_core.errors import VisionFMError
from visionfm_core.modalities import canonical_modality, get_modality

MIN_FREE_DISK_GB = 5.0
MIN_AVAILABLE_MEMORY_GB = 4.0


@dataclass
class Check:
    """One verdict of the preflight."""

    name: str
    verdict: str  # "ok", "warn", "fail" or "skip" (not checked)
    message: str
    details: list[str] = field(default_factory=list)  # local-only lines (may name files)


def modality_folder(data_path: Path, modality: str, several: bool) -> Path:
    """Where a modality's images are: a sub-folder named after it when the site holds several.
    DataError when that sub-folder is a link out of the data folder (nothing there is read)."""
    from visionfm_core.data.confine import OUTSIDE_REASON, escapes
    from visionfm_core.errors import DataError

    folder = data_path / modality
    if several and folder.is_dir():
        if escapes(data_path, modality):
            raise DataError(str(folder), OUTSIDE_REASON)
        return folder
    return data_path


def check_data(data_path: Path, modalities: list[str], decode: bool = True) -> list[Check]:
    """Readable path; per modality: usable images, wrong-modality and unreadable files."""
    from visionfm_core.data.preflight import check_site_data

    if not data_path.exists():
        return [Check("data", "fail", f"data path {data_path} does not exist")]
    if not os.access(data_path, os.R_OK):
        return [Check("data", "fail", f"data path {data_path} is not readable by this user")]
    checks = []
    canonical = [canonical_modality(m) for m in modalities]
    for modality in canonical:
        try:
            folder = modality_folder(data_path, modality, len(canonical) > 1)
            report = check_site_data(folder, modality, decode=decode)
        except VisionFMError as exc:
            checks.append(Check(f"data:{modality}", "fail", str(exc)))
            continue
        problems = [
            f"{s.path}: {s.reason}"
            for s in (*report.unreadable, *report.wrong_modality, *report.label_problems)
        ]
        counts = ", ".join(f"{m} {n}" for m, n in sorted(report.images_per_modality.items())) or "none"
        message = f"{report.usable_images} usable image(s) ({counts})"
        if report.wrong_modality:
            message += f"; {len(report.wrong_modality)} file(s) of another modality"
        outside = [s for s in report.unreadable if s.kind is ProblemKind.OUTSIDE_DATA_FOLDER]
        if outside:
            message += f"; {len(outside)} link(s) to files outside the data folder refused"
        if len(report.unreadable) > len(outside):
            message += f"; {len(report.unreadable) - len(outside)} unreadable file(s)"
        verdict = "ok"
        if not report.ok:
            verdict = "fail"
        elif report.unreadable or report.label_problems:
            verdict = "warn"
        checks.append(Check(f"data:{modality}", verdict, message, problems))
        if report.median_aspect is not None:
            checks.append(aspect_check(modality, report.median_aspect))
    return checks


def aspect_check(modality: str, median: float) -> Check:
    """How this site's images compare with the input shape federated fine-tuning uses by default
    (`finetune-input-aspect = auto`): the coordinator cannot measure it, so the hospital is told here,
    on its own console, and may pass the number on to the coordinator."""
    default = get_modality(modality).federated_aspect
    message = (f"images {median:.2f}:1 (width:height, median); federated fine-tuning's default input is "
               f"{default:g}:1")
    if abs(math.log(median / default)) <= math.log(1.25):
        return Check(f"aspect:{modality}", "ok", message)
    return Check(f"aspect:{modality}", "warn", message + f" (fits, with less detail): a coordinator whose sites "
                                                          f"scan alike can set finetune-input-aspect = "
                                                          f"\"{modality}={median:.2f}\"")


def check_task_manifest(spec: str, kind: str, modalities: list[str], data_path: Path | None = None) -> list[Check]:
    """A fine-tuning task manifest: it parses; every image and mask file it names exists, is an image,
    and lies inside the data folder or the manifest's own folder (links resolved); and every mask can be
    read and has its image's size."""
    from client.site import read_task_manifests, task_manifest_entries
    from visionfm_core.tasks.manifests import manifest_roots, task_file_problems
    from visionfm_core.tasks.mask_check import mask_pair_problems

    try:
        per_modality = read_task_manifests(spec, kind, [canonical_modality(m) for m in modalities])
        csv_of = {canonical_modality(m) if m else canonical_modality(modalities[0]): p
                  for m, p in task_manifest_entries(spec)}
    except VisionFMError as exc:
        return [Check("task", "fail", str(exc))]
    checks = []
    for modality, samples in per_modality.items():
        problems = task_file_problems(samples, manifest_roots(csv_of[modality], data_path))
        if problems:
            missing = sum(line.endswith(": does not exist") for line in problems)
            outside = sum("outside the data folder" in line for line in problems)
            parts = [f"{missing} file(s) named in the {kind} manifest do not exist" if missing else "",
                     f"{outside} file(s) outside the data folder and the manifest's folder refused" if outside else "",
                     f"{len(problems) - missing - outside} file(s) that are not images"
                     if len(problems) - missing - outside else ""]
            checks.append(Check(f"task:{modality}", "fail", "; ".join(p for p in parts if p), sorted(problems)[:20]))
        elif not samples:
            checks.append(Check(f"task:{modality}", "fail", f"the {kind} manifest lists no samples"))
        elif bad_pairs := mask_pair_problems(samples):
            checks.append(Check(f"task:{modality}", "fail", f"{len(bad_pairs)} of {len(samples)} image/mask "
                                                            "pair(s) cannot be used", bad_pairs))
        else:
            checks.append(Check(f"task:{modality}", "ok", f"{len(samples)} {kind} samples"))
    return checks


def check_gpu(gpu: int | None) -> Check:
    """The accelerator the ClientApp will use, or the CPU fallback."""
    if gpu is not None and gpu < 0:
        return Check("gpu", "ok", "CPU requested (--gpu -1)")
    try:
        import torch
    except ImportError:
        return Check("gpu", "fail", "torch is not installed")
    if not torch.cuda.is_available():
        message = "no CUDA GPU found: training falls back to the CPU (much slower)"
        return Check("gpu", "fail" if gpu is not None else "warn", message)
    count = torch.cuda.device_count()
    if gpu is not None and gpu >= count:
        return Check("gpu", "fail", f"GPU index {gpu} requested but only {count} GPU(s) visible")
    index = gpu or 0
    props = torch.cuda.get_device_properties(index)
    return Check("gpu", "ok", f"GPU {index}: {props.name}, {props.total_memory / 2**30:.0f} GiB")


def _available_memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def check_resources(work_dir: Path) -> list[Check]:
    """Free disk where the site writes, and available memory."""
    target = work_dir if work_dir.exists() else work_dir.parent if work_dir.parent.exists() else Path(".")
    free_gb = shutil.disk_usage(target).free / 2**30
    disk = Check(
        "disk",
        "ok" if free_gb >= MIN_FREE_DISK_GB else "warn",
        f"{free_gb:.1f} GB free at {target}"
        + ("" if free_gb >= MIN_FREE_DISK_GB else f" (below {MIN_FREE_DISK_GB:.0f} GB)"),
    )
    memory_gb = _available_memory_gb()
    if memory_gb is None:
        return [disk, Check("memory", "warn", "could not read available memory")]
    memory = Check(
        "memory",
        "ok" if memory_gb >= MIN_AVAILABLE_MEMORY_GB else "warn",
        f"{memory_gb:.1f} GB available"
        + ("" if memory_gb >= MIN_AVAILABLE_MEMORY_GB else f" (below {MIN_AVAILABLE_MEMORY_GB:.0f} GB)"),
    )
    return [disk, memory]


def check_bundle(bundle_dir: Path, coordinator: str | None, online: bool) -> list[Check]:
    """The bundle is complete and consistent; with `online`, the coordinator accepts it."""
    try:
        bundle = load_bundle(bundle_dir)
    except CertificateError as exc:
        return [Check("bundle", "fail", str(exc))]
    findings = verify_bundle(bundle_dir, expected_address=coordinator)
    errors = [str(f) for f in findings if f.level == "error"]
    warnings = [str(f) for f in findings if f.level == "warning"]
    if errors:
        checks = [
            Check(
                "bundle", "fail", f"{len(errors)} problem(s) with the certificate bundle", errors + warnings
            )
        ]
    else:
        verdict = "warn" if warnings else "ok"
        checks = [
            Check(
                "bundle", verdict, f"bundle of {bundle.hospital} for {bundle.coordinator_address}", warnings
            )
        ]
    if online:
        probe = probe_coordinator(bundle, coordinator)
        checks.append(Check("coordinator", "ok" if probe.ok else "fail", probe.message))
    return checks


def run_checks(
    data_path: Path,
    modalities: list[str],
    bundle_dir: Path | None,
    work_dir: Path,
    coordinator: str | None = None,
    gpu: int | None = None,
    online: bool = True,
    decode: bool = True,
    task_manifest: str | None = None,
    task: str = "segmentation",
) -> list[Check]:
    """Every preflight check, in the order they are shown. Without a bundle (a data-only check) the
    certificate and coordinator checks are skipped, and a line says so."""
    if bundle_dir is None:
        certificates = [Check("bundle", "skip", "no --bundle given: certificate and coordinator checks skipped")]
    else:
        certificates = check_bundle(bundle_dir, coordinator, online)
    return [
        *check_data(data_path, modalities, decode),
        *(check_task_manifest(task_manifest, task, modalities, data_path) if task_manifest else []),
        check_gpu(gpu),
        *check_resources(work_dir),
        *certificates,
    ]
