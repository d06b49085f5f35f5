"""A site's privacy ledger: every DP spending on a dataset, for the dataset's whole life.

A site's epsilon is a promise about its patients' images for as long as they are used, so the record of
what was spent lives in the site's work folder (`<work>/privacy/`), not in a run's state: it survives
restarts, new runs, `--resume` and a new coordinator. One ledger per dataset, keyed by a fingerprint of
the images' contents (`dataset_fingerprint`): the same images under another path are the same dataset.

Each ledger is a JSON-lines file: a header (the dataset's fingerprint, modality, image count), then one
entry per charge (run, phase, round, mechanism, noise multiplier, sample rate, steps, the epsilon after
it and the budget in force), each carrying the SHA-256 of the previous one, so any edit, deletion or
reordering breaks the chain. A `.head` file holds the count and last hash, so a truncated ledger is
detected too. A damaged ledger raises `PrivacyLedgerDamaged` and the site refuses to train on that data.

A round is charged *before* it is trained (`LedgerBook.charge`): Opacus' accountant composes the whole
history with the new steps and refuses (`PrivacyBudgetExceeded`) if the site's lifetime budget would be
exceeded. A round that then fails is still counted: over-counting is safe, under-counting is not.

Datasets that share images (a segmentation manifest over some of the images pretrained on) are charged
together: a charge goes to every ledger whose dataset overlaps the trained one, so each ledger's epsilon
bounds the spending of every image in it. `<fingerprint>.members` lists the per-image content hashes (no
path, no name) that decide overlaps; it is checked against the fingerprint when read.

Entries are never dated out: spending from years ago counts as much as today's.

The chain makes damage and edits evident; it is not a signature: whoever administers the site could
rewrite the whole chain, or delete the whole folder (back it up with the site's other records; the
audit log keeps the epsilon of every reply too).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from stat import S_ISREG
from typing import Any

import numpy as np

from client.privacy.accountant import HistoryEntry, PrivacyBudget, SiteAccountant
from strategies.protocol.dp_config import Mechanism
from visionfm_core.data.items import ImageItem
from visionfm_core.errors import VisionFMError
from visionfm_core.models.checkpoint import atomic_write_bytes

GENESIS = "0" * 64
MECHANISM = "poisson-subsampled-gaussian"
FORMAT = "visionfm-privacy-ledger/1"
_CACHE = "content-hashes.json"
# Ledger bytes this process has verified (path -> SHA-256 of the bytes, entries): a round re-reads and
# re-hashes the file, but parses and re-chains it only when its bytes differ from what was verified.
_VERIFIED: dict[str, tuple[bytes, tuple[dict[str, Any], ...]]] = {}
_LOCK = ".lock"
WHAT_TO_DO = (
    "the site refuses to train on this dataset. Restore the ledger folder from the site's backup; do not "
    "delete or edit it (a new ledger would forget the epsilon already spent). If it cannot be restored, "
    "the images' privacy budget must be treated as spent"
)


class PrivacyLedgerDamaged(VisionFMError):  # noqa: N818 - reads as the condition, like PrivacyBudgetExceeded
    """A ledger's hash chain, head or member list does not verify; nothing may train on its dataset."""

    def __init__(self, ledger: str, problem: str) -> None:
        super().__init__(f"privacy ledger {ledger} is damaged ({problem}): {WHAT_TO_DO}")
        self.ledger = ledger
        self.problem = problem


def _now_iso(clock: Callable[[], float]) -> str:
    return datetime.fromtimestamp(clock(), tz=timezone.utc).isoformat(timespec="seconds")


def _entry_hash(entry: Mapping[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fingerprint_of(member_digests: Iterable[str]) -> str:
    """The dataset key: SHA-256 over its images' content hashes, sorted (order and paths do not matter)."""
    return hashlib.sha256("\n".join(sorted(member_digests)).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Image content hashes


class ContentHashes:
    """Per-image SHA-256 of the contents, cached by (hashed path, size, mtime) in the ledger folder, so
    a round re-hashes only images that changed. The cache holds no path, only its hash."""

    def __init__(self, folder: Path | None) -> None:
        self.path = None if folder is None else folder / _CACHE
        self._cache: dict[str, str] = {}
        self._dirty = False
        if self.path is not None and self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text())
                self._cache = {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self._cache = {}  # only a cache: rebuilt from the images

    def digest(self, item: ImageItem) -> str:
        """The content hash of one image (with its frame for multi-frame files)."""
        frame = "" if item.frame is None else f"#{item.frame}"
        array = getattr(item, "_array", None)
        if array is not None:
            return self._array_digest(array) + frame
        path = Path(item.source)
        try:
            stat = os.stat(path)
        except (OSError, ValueError):
            stat = None
        if stat is not None and S_ISREG(stat.st_mode):
            # abspath, not resolve(): a cache key needs no symlink walk (one stat per image per round).
            key = hashlib.sha256(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
            cached = self._cache.get(key)
            if cached is None:
                hasher = hashlib.sha256()
                with path.open("rb") as handle:
                    for chunk in iter(lambda: handle.read(1 << 20), b""):
                        hasher.update(chunk)
                cached = hasher.hexdigest()
                self._cache[key] = cached
                self._dirty = True
            return cached + frame
        return self._array_digest(item.load()) + frame

    @staticmethod
    def _array_digest(array: np.ndarray) -> str:
        contiguous = np.ascontiguousarray(array)
        hasher = hashlib.sha256(f"{contiguous.dtype}|{contiguous.shape}|".encode())
        hasher.update(contiguous.data)
        return hasher.hexdigest()

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        payload = json.dumps(self._cache, sort_keys=True).encode()
        atomic_write_bytes(self.path, lambda tmp: Path(tmp).write_bytes(payload))
        os.chmod(self.path, 0o600)
        self._dirty = False


def image_digests(items: Iterable[ImageItem], folder: Path | None = None) -> list[str]:
    """Content hashes of `items` (cached in `folder` when given)."""
    hashes = ContentHashes(folder)
    digests = [hashes.digest(item) for item in items]
    hashes.save()
    return digests


def dataset_fingerprint(items: Iterable[ImageItem], folder: Path | None = None) -> str:
    """A dataset's fingerprint: the same images give the same key wherever they are stored."""
    return fingerprint_of(image_digests(items, folder))


# --------------------------------------------------------------------------------------------------
# One ledger


@dataclass(frozen=True)
class Charge:
    """What one training round spends on a dataset (recorded before it runs)."""

    run: int
    phase: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    modality: str = ""


class PrivacyLedger:
    """One dataset's append-only, hash-chained ledger (see the module docstring)."""

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        self.path = folder / f"{fingerprint}.jsonl"
        self.head_path = folder / f"{fingerprint}.head"
        self.members_path = folder / f"{fingerprint}.members"
        self.name = f"{fingerprint[:12]}"  # how messages name it: no path, no site detail

    def exists(self) -> bool:
        return self.path.exists() or self.head_path.exists()

    # -- reading -----------------------------------------------------------------------------------
    def entries(self) -> list[dict[str, Any]]:
        """Every line (header first), verified; raises PrivacyLedgerDamaged when anything is off."""
        if not self.path.exists():
            if self.head_path.exists() or self.members_path.exists():
                raise PrivacyLedgerDamaged(self.name, "the ledger file is missing (deleted?) but its head or "
                                                      "member list is there")
            return []
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise PrivacyLedgerDamaged(self.name, f"unreadable: {type(exc).__name__}") from exc
        digest = hashlib.sha256(raw).digest()
        known = _VERIFIED.get(str(self.path))
        if known is not None and known[0] == digest:
            # These very bytes verified already in this process: only the head can have changed.
            entries = list(known[1])
        else:
            entries = self._verify(raw)
            _VERIFIED[str(self.path)] = (digest, tuple(entries))
        self._check_head(entries)
        return entries

    def _verify(self, raw: bytes) -> list[dict[str, Any]]:
        """The entries of the ledger's bytes, after checking the whole chain, header and every charge."""
        try:
            lines = raw.decode("utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise PrivacyLedgerDamaged(self.name, "unreadable: not UTF-8") from exc
        entries: list[dict[str, Any]] = []
        previous = GENESIS
        for number, line in enumerate(lines, start=1):
            try:
                entry = json.loads(line)
            except ValueError as exc:
                raise PrivacyLedgerDamaged(self.name, f"line {number} is not JSON") from exc
            if not isinstance(entry, dict):
                raise PrivacyLedgerDamaged(self.name, f"line {number} is not an entry")
            chained = entry.get("seq") == number - 1 and entry.get("prev") == previous
            if not chained or entry.get("hash") != _entry_hash(entry):
                raise PrivacyLedgerDamaged(self.name, f"line {number} does not match the hash chain "
                                                      "(edited, removed or reordered entries)")
            previous = str(entry["hash"])
            entries.append(entry)
        if not entries or entries[0].get("kind") != "open" or entries[0].get("fingerprint") != self.fingerprint:
            raise PrivacyLedgerDamaged(self.name, "its header does not name this dataset")
        for entry in entries[1:]:
            _check_charge_fields(self.name, entry)
        return entries

    def _check_head(self, entries: list[dict[str, Any]]) -> None:
        try:
            head = json.loads(self.head_path.read_text())
            count, last = int(head["entries"]), str(head["hash"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PrivacyLedgerDamaged(self.name, "its head file is missing or unreadable") from exc
        if count == len(entries) and last == entries[-1]["hash"]:
            return
        # A crash between appending an entry and updating the head leaves exactly one more entry, chained
        # to the head's: it is kept (over-counting is safe) and the head is brought up to date.
        if count == len(entries) - 1 and count >= 1 and entries[count - 1]["hash"] == last:
            self._write_head(entries)
            return
        raise PrivacyLedgerDamaged(self.name, f"it holds {len(entries)} entries, its head records {count} "
                                              "(truncated or replaced)")

    def members(self) -> set[str]:
        """The per-image content hashes of the dataset, checked against the fingerprint."""
        try:
            digests = [line for line in self.members_path.read_text().splitlines() if line]
        except OSError as exc:
            raise PrivacyLedgerDamaged(self.name, "its member list is missing") from exc
        if fingerprint_of(digests) != self.fingerprint:
            raise PrivacyLedgerDamaged(self.name, "its member list does not match the fingerprint")
        return set(digests)

    def charges(self) -> list[dict[str, Any]]:
        return self.entries()[1:]

    def history(self, entries: Sequence[Mapping[str, Any]] | None = None) -> list[HistoryEntry]:
        """The charges in Opacus' (noise multiplier, sample rate, steps) form."""
        rows = self.charges() if entries is None else [e for e in entries if e.get("kind") == "charge"]
        merged: list[HistoryEntry] = []
        for e in rows:  # consecutive charges of one mechanism compose as one (as Opacus keeps its history)
            sigma, rate, steps = float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])
            if merged and merged[-1][:2] == (sigma, rate):
                merged[-1] = (sigma, rate, merged[-1][2] + steps)
            else:
                merged.append((sigma, rate, steps))
        return merged

    # -- writing -----------------------------------------------------------------------------------
    def create(self, modality: str, members: Sequence[str], clock: Callable[[], float]) -> None:
        """Header first, then the member list: a crash in between leaves a ledger that reports itself
        damaged rather than one that silently starts again."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        header = {"kind": "open", "format": FORMAT, "fingerprint": self.fingerprint, "modality": modality,
                  "images": len(members), "time": _now_iso(clock)}
        self._append([], header)
        listing = ("\n".join(sorted(members)) + "\n").encode()
        atomic_write_bytes(self.members_path, lambda tmp: Path(tmp).write_bytes(listing))
        os.chmod(self.members_path, 0o600)

    def append_charge(self, entries: list[dict[str, Any]], fields: Mapping[str, Any]) -> dict[str, Any]:
        return self._append(entries, {"kind": "charge", **fields})

    def _append(self, entries: list[dict[str, Any]], body: dict[str, Any]) -> dict[str, Any]:
        entry = {**body, "seq": len(entries), "prev": entries[-1]["hash"] if entries else GENESIS}
        entry["hash"] = _entry_hash(entry)
        line = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        entries.append(entry)
        self._write_head(entries)
        _VERIFIED[str(self.path)] = (hashlib.sha256(self.path.read_bytes()).digest(), tuple(entries))
        return entry

    def _write_head(self, entries: Sequence[Mapping[str, Any]]) -> None:
        payload = json.dumps({"entries": len(entries), "hash": entries[-1]["hash"]}).encode()
        atomic_write_bytes(self.head_path, lambda tmp: Path(tmp).write_bytes(payload))
        os.chmod(self.head_path, 0o600)


def _check_charge_fields(name: str, entry: Mapping[str, Any]) -> None:
    try:
        sigma, rate, steps = float(entry["noise_multiplier"]), float(entry["sample_rate"]), int(entry["steps"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PrivacyLedgerDamaged(name, f"entry {entry.get('seq')} lacks its mechanism") from exc
    if entry.get("kind") != "charge" or not (sigma >= 0 and math.isfinite(sigma)) or not 0 < rate <= 1 or steps < 0:
        raise PrivacyLedgerDamaged(name, f"entry {entry.get('seq')} is not a valid charge")


# --------------------------------------------------------------------------------------------------
# The site's book of ledgers


class LedgerBook:
    """All ledgers in a site's ledger folder; charges a training round to every dataset it touches."""

    def __init__(self, folder: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.folder = Path(folder)
        self.clock = clock

    def ledgers(self) -> list[PrivacyLedger]:
        if not self.folder.is_dir():
            return []
        keys = {p.name.split(".", 1)[0] for p in self.folder.iterdir()
                if p.suffix in (".jsonl", ".head", ".members") and not p.name.startswith(".")}
        return [PrivacyLedger(self.folder, key) for key in sorted(keys)]

    def verify_all(self) -> None:
        """Raise PrivacyLedgerDamaged for the first ledger that does not verify."""
        for ledger in self.ledgers():
            ledger.entries()
            ledger.members()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time (a SuperNode may serve two runs, or two modalities, at once)."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.folder / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def touching(self, members: Sequence[str]) -> list[PrivacyLedger]:
        """The ledgers whose datasets share at least one image with `members` (the exact one included)."""
        wanted = set(members)
        exact = fingerprint_of(members)
        found = []
        for ledger in self.ledgers():
            if ledger.fingerprint == exact or ledger.members() & wanted:
                found.append(ledger)
        return found

    def accountant(self, members: Sequence[str], budget: PrivacyBudget, mechanism: Mechanism = "rdp",
                   label: str = "this site") -> SiteAccountant:
        """An accountant holding this dataset's lifetime history (the largest of the ledgers it touches)."""
        with self._locked():
            found = self._accountants(members, budget, mechanism, label)
        return found[0][1] if found else SiteAccountant(budget, mechanism, label)

    def _accountants(self, members: Sequence[str], budget: PrivacyBudget, mechanism: Mechanism,
                     label: str) -> list[tuple[PrivacyLedger, SiteAccountant, list[dict[str, Any]]]]:
        found = []
        for ledger in self.touching(members):
            entries = ledger.entries()
            accountant = SiteAccountant(budget, mechanism, label)
            accountant._load_rows([list(row) for row in ledger.history(entries)], "ledger")
            found.append((ledger, accountant, entries))
        # The most-spent ledger first: its accountant is the one a trainer checks against.
        found.sort(key=lambda t: -t[1].epsilon_spent())
        return found

    def charge(self, members: Sequence[str], modality: str, charge: Charge, budget: PrivacyBudget,
               mechanism: Mechanism = "rdp", label: str = "this site") -> SiteAccountant:
        """Record `charge` on every ledger of the datasets it touches, after checking that none of them
        would exceed `budget` (PrivacyBudgetExceeded otherwise: nothing is recorded, nothing may train).

        Returns an accountant holding the most-spent ledger's history *before* this charge, for the
        trainer: its own check passes and its per-step spending ends where the ledger does."""
        with self._locked():
            found = self._accountants(members, budget, mechanism, label)
            exact = fingerprint_of(members)
            inherited: list[dict[str, Any]] = []
            if not any(ledger.fingerprint == exact for ledger, _, _ in found):
                # A new dataset sharing images with known ones starts with their spending (all of it:
                # over-counting the shared images' past is safe, forgetting it is not).
                inherited = [e for _, _, entries in found for e in entries[1:]]
                fresh = SiteAccountant(budget, mechanism, label)
                fresh._load_rows([[e["noise_multiplier"], e["sample_rate"], e["steps"]] for e in inherited], "ledger")
                found.append((PrivacyLedger(self.folder, exact), fresh, []))
            for _, accountant, _ in found:
                accountant.check(charge.steps, charge.noise_multiplier, charge.sample_rate)
            for ledger, _, entries in found:
                if not entries:
                    ledger.create(modality, members, self.clock)
                    entries.extend(ledger.entries())
                    for entry in inherited:
                        body = {k: v for k, v in entry.items() if k not in ("seq", "prev", "hash")}
                        ledger.append_charge(entries, {**body, "inherited": True})
            found.sort(key=lambda t: -t[1].epsilon_spent())
            for ledger, accountant, entries in found:
                after = accountant.epsilon_after(charge.steps, charge.noise_multiplier, charge.sample_rate)
                ledger.append_charge(entries, {
                    "time": _now_iso(self.clock), "run": int(charge.run), "phase": charge.phase,
                    "round": int(charge.round), "modality": charge.modality or modality, "mechanism": MECHANISM,
                    "accountant": mechanism, "noise_multiplier": float(charge.noise_multiplier),
                    "sample_rate": float(charge.sample_rate), "steps": int(charge.steps),
                    "epsilon_after": after, "delta": budget.delta, "epsilon_budget": budget.epsilon,
                })
            return found[0][1]


# --------------------------------------------------------------------------------------------------
# Summaries for `visionfm-client audit --privacy`


@dataclass
class RunSpending:
    run: int
    phases: list[str]
    rounds: int
    steps: int
    epsilon_alone: float   # what this run's charges alone cost
    epsilon_after: float   # the dataset's lifetime epsilon after the run's last charge


@dataclass
class DatasetSpending:
    fingerprint: str
    modality: str
    images: int
    entries: int
    epsilon_spent: float
    epsilon_budget: float | None
    delta: float | None
    first: str | None
    last: str | None
    runs: list[RunSpending]
    problem: str | None = None

    @property
    def remaining(self) -> float | None:
        if self.epsilon_budget is None:
            return None
        return max(0.0, self.epsilon_budget - self.epsilon_spent)


def summarise_ledgers(folder: str | Path) -> list[DatasetSpending]:
    """Spent and remaining epsilon per dataset, and per run within it (damaged ledgers are listed)."""
    summaries = []
    for ledger in LedgerBook(folder).ledgers():
        try:
            entries = ledger.entries()
            ledger.members()
        except PrivacyLedgerDamaged as exc:
            summaries.append(DatasetSpending(ledger.fingerprint, "?", 0, 0, math.nan, None, None, None, None, [],
                                             problem=exc.problem))
            continue
        header, charges = entries[0], entries[1:]
        last = charges[-1] if charges else None
        delta = float(last["delta"]) if last else None
        mechanism = str(last["accountant"]) if last else "rdp"
        spent = _epsilon(ledger.history(entries), delta, mechanism) if delta else 0.0
        runs: dict[int, list[dict[str, Any]]] = {}
        for entry in charges:
            runs.setdefault(int(entry["run"]), []).append(entry)
        run_rows = [RunSpending(run, sorted({str(e["phase"]) for e in rows}),
                                len({(e["phase"], e["round"]) for e in rows}),
                                sum(int(e["steps"]) for e in rows),
                                _epsilon(ledger.history(rows), delta, mechanism) if delta else 0.0,
                                float(rows[-1]["epsilon_after"]))
                    for run, rows in runs.items()]
        summaries.append(DatasetSpending(
            ledger.fingerprint, str(header.get("modality", "")), int(header.get("images", 0)), len(charges), spent,
            float(last["epsilon_budget"]) if last else None, delta, str(charges[0]["time"]) if charges else None,
            str(last["time"]) if last else None, run_rows))
    return summaries


def _epsilon(history: Sequence[HistoryEntry], delta: float, mechanism: str) -> float:
    from client.privacy.accountant import epsilon_of

    return epsilon_of(history, delta, "prv" if mechanism == "prv" else "rdp")
