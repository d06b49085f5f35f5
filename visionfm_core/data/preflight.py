"""Check a site's data before it joins a federation (`visionfm-client check`).

The report has two faces: `render()` for the hospital's own console (names the files at fault), and
`to_public_dict()`, the only form that may leave the site: counts and problem categories, never
paths, file names, patient IDs or label texts.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visionfm_core.data.problems import ProblemKind, problem_kind
from visionfm_core.data.site import SiteOptions, scan_site, select_frames
from visionfm_core.data.sources import ScanResult, SkippedFile
from visionfm_core.errors import DataError
from visionfm_core.modalities import canonical_modality, get_modality

UNKNOWN_MODALITY = "unknown"
_LABEL_KINDS = frozenset({ProblemKind.NO_LABEL_ROW, ProblemKind.FILE_NOT_FOUND})


@dataclass
class SiteDataReport:
    """What a site holds and what is wrong with it. `images_per_modality` counts usable images (one
    per selected frame of a volume) after any decoding check."""

    modality: str | None
    files_indexed: int = 0
    images_per_modality: dict[str, int] = field(default_factory=dict)
    unreadable: list[SkippedFile] = field(default_factory=list)
    wrong_modality: list[SkippedFile] = field(default_factory=list)
    label_problems: list[SkippedFile] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    label_counts: dict[str, int] = field(default_factory=dict)
    laterality_counts: dict[str, int] = field(default_factory=dict)
    patients: int = 0
    decoded: int = 0
    seconds: float = 0.0
    # Median width / height of the images (modalities that keep their aspect, e.g. OCT B-scans): shown
    # on the local console so the hospital can tell the coordinator which `finetune-input-aspect` fits;
    # never in `to_public_dict`.
    median_aspect: float | None = None

    @property
    def usable_images(self) -> int:
        return sum(self.images_per_modality.values())

    @property
    def ok(self) -> bool:
        """True when the site has images to train on. Unreadable and wrong-modality files are left
        out of training, so they call for a look (warning), not a refusal."""
        return self.usable_images > 0

    def to_public_dict(self) -> dict[str, Any]:
        """Counts and categories only, safe to send to the coordinator. Classes appear by index; the
        fingerprint lets the coordinator check that sites agree on class names without seeing them."""
        names_digest = hashlib.sha256("\n".join(self.class_names).encode("utf-8")).hexdigest()[:16]
        return {
            "modality": self.modality,
            "files_indexed": self.files_indexed,
            "usable_images": self.usable_images,
            "images_per_modality": dict(sorted(self.images_per_modality.items())),
            "unreadable_by_reason": _count_kinds(self.unreadable),
            "wrong_modality_by_found": dict(
                sorted(Counter(s.found_modality or UNKNOWN_MODALITY for s in self.wrong_modality).items())
            ),
            "label_problems_by_reason": _count_kinds(self.label_problems),
            "num_classes": len(self.class_names),
            "class_names_fingerprint": names_digest if self.class_names else None,
            "images_per_class": {str(i): self.label_counts.get(n, 0) for i, n in enumerate(self.class_names)},
            "laterality": dict(sorted(self.laterality_counts.items())),
            "patients": self.patients,
            "decoded": self.decoded,
        }

    def render(self) -> str:
        """A plain-text report for the local console; it names files, so it must stay on the site."""
        lines = [
            f"modality: {self.modality or 'from DICOM tags'}",
            f"files indexed: {self.files_indexed}, usable images: {self.usable_images}"
            + (f" (all {self.decoded} decoded)" if self.decoded else " (headers only)"),
        ]
        lines += [f"  {name}: {count}" for name, count in sorted(self.images_per_modality.items())]
        if self.class_names:
            lines.append(
                "labels: " + ", ".join(f"{n}={self.label_counts.get(n, 0)}" for n in self.class_names)
            )
        if self.patients:
            lines.append(f"patients: {self.patients}")
        if self.median_aspect is not None:
            lines.append(f"median width:height: {self.median_aspect:.2f}")
        for title, skipped in (
            ("unreadable", self.unreadable),
            ("wrong modality", self.wrong_modality),
            ("label problems", self.label_problems),
        ):
            if skipped:
                lines.append(f"{title}: {len(skipped)}")
                lines += [f"  {s.path}: [{s.kind.value}] {s.reason}" for s in skipped]
        left_out = len(self.unreadable) + len(self.wrong_modality) + len(self.label_problems)
        verdict = "NOT READY (no usable image)" if not self.ok else "OK"
        if self.ok and left_out:
            verdict += f", {left_out} file(s) left out (see above)"
        lines.append(f"result: {verdict}")
        return "\n".join(lines)


def _count_kinds(skipped: list[SkippedFile]) -> dict[str, int]:
    return dict(sorted(Counter(s.kind.value for s in skipped).items()))


def _decode_all(scan: ScanResult) -> tuple[ScanResult, list[SkippedFile], int]:
    """Decode every item; drop those that fail (once per file) and report them."""
    failed: dict[str, SkippedFile] = {}
    kept = []
    for item in scan.items:
        if item.source in failed:
            continue
        try:
            item.load()
        except DataError as exc:
            failed[item.source] = SkippedFile(exc.path or item.source, exc.reason, problem_kind(exc))
            continue
        kept.append(item)
    kept = [i for i in kept if i.source not in failed]
    return ScanResult(kept, scan.skipped, scan.class_names), list(failed.values()), len(kept)


def check_site_data(
    path: str | Path,
    modality: str | None = None,
    labels_csv: str | Path | None = None,
    *,
    decode: bool = True,
    slices: str = "all",
    override_tags: bool = False,
    state_dir: str | Path | None = None,
) -> SiteDataReport:
    """Index (and with `decode`, fully decode) a site's data and report on it; never raises for a bad
    file, only for a missing path or a bad argument. Arguments as for `open_site`."""
    started = time.perf_counter()
    select_frames(1, slices)
    canonical = None if modality is None else canonical_modality(modality)
    options = SiteOptions(canonical, override_tags, slices)
    scan, index = scan_site(path, options, labels_csv, state_dir=state_dir)
    decode_failures: list[SkippedFile] = []
    decoded = 0
    if decode:
        scan, decode_failures, decoded = _decode_all(scan)
    report = SiteDataReport(modality=canonical, class_names=list(scan.class_names), decoded=decoded)
    report.files_indexed = (
        len(index.entries) if index is not None else len({i.source for i in scan.items}) + len(scan.skipped)
    )
    for skipped in scan.skipped + decode_failures:
        if skipped.kind is ProblemKind.WRONG_MODALITY:
            report.wrong_modality.append(skipped)
        elif skipped.kind in _LABEL_KINDS and "labels CSV" in skipped.reason:
            report.label_problems.append(skipped)
        else:
            report.unreadable.append(skipped)
    report.images_per_modality = dict(Counter(i.modality or UNKNOWN_MODALITY for i in scan.items))
    report.label_counts = dict(
        Counter(
            scan.class_names[i.label]
            for i in scan.items
            if i.label is not None and 0 <= i.label < len(scan.class_names)
        )
    )
    report.laterality_counts = dict(Counter(i.laterality for i in scan.items if i.laterality))
    report.patients = len({i.patient_key for i in scan.items if i.patient_key})
    if canonical is not None and get_modality(canonical).native_aspect and scan.items:
        from visionfm_core.tasks.aspect import median_aspect

        report.median_aspect = median_aspect(scan.items)
    report.seconds = time.perf_counter() - started
    return report
