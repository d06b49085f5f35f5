"""The site's lifetime privacy ledger: keyed by the images' contents, hash-chained, composed by Opacus'
accountant across runs and years, refusing a charge that would overshoot, detecting any damage."""

from __future__ import annotations

import json
import math
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.privacy.accountant import PrivacyBudget, PrivacyBudgetExceeded, epsilon_of
from client.privacy.ledger import (
    Charge,
    LedgerBook,
    PrivacyLedgerDamaged,
    dataset_fingerprint,
    image_digests,
    summarise_ledgers,
)
from visionfm_core.data.items import ImageItem

BUDGET = PrivacyBudget(1.0, 1e-5)
SIGMA, RATE, STEPS = 1.5, 0.02, 10


def _members(count: int = 16, offset: int = 0) -> list[str]:
    items = [ImageItem(f"img{i}", _array=np.full((4, 4, 3), i, np.uint8)) for i in range(offset, offset + count)]
    return image_digests(items)


def _charge(run: int, rnd: int, steps: int = STEPS, phase: str = "pretrain") -> Charge:
    return Charge(run, phase, rnd, SIGMA, RATE, steps, "fundus")


class YearClock:
    """A clock the test moves forward: spending dated across years."""

    def __init__(self, year: int) -> None:
        self.now = datetime(year, 3, 1, tzinfo=timezone.utc).timestamp()

    def __call__(self) -> float:
        return self.now

    def years(self, count: float) -> None:
        self.now += count * 365.25 * 86400


def test_same_images_under_another_path_are_the_same_dataset(tmp_path: Path) -> None:
    pixels = [np.random.default_rng(i).integers(0, 255, (8, 8, 3), dtype=np.uint8) for i in range(5)]
    for folder in ("a", "b/copy"):
        (tmp_path / folder).mkdir(parents=True)
        for i, image in enumerate(pixels):
            Image.fromarray(image).save(tmp_path / folder / f"{folder.replace('/', '_')}-{i}.png")
    first = [ImageItem(str(p)) for p in sorted((tmp_path / "a").glob("*.png"))]
    moved = [ImageItem(str(p)) for p in sorted((tmp_path / "b" / "copy").glob("*.png"), reverse=True)]
    cache = tmp_path / "ledger"
    assert dataset_fingerprint(first, cache) == dataset_fingerprint(moved, cache)
    assert dataset_fingerprint(first[:4], cache) != dataset_fingerprint(first, cache)
    # The content-hash cache names no path.
    assert str(tmp_path) not in (cache / "content-hashes.json").read_text()


def test_charges_compose_across_runs_and_years_and_the_round_past_the_budget_is_refused(tmp_path: Path) -> None:
    clock = YearClock(2024)
    members = _members()
    rounds = 0
    with pytest.raises(PrivacyBudgetExceeded):
        for index in range(100):  # two rounds a year, each run a new book (a restart, a new coordinator)
            LedgerBook(tmp_path, clock).charge(members, "fundus", _charge(10 + index // 2, index % 2 + 1), BUDGET)
            rounds += 1
            clock.years(0.5)
    book = LedgerBook(tmp_path, clock)
    (ledger,) = book.ledgers()
    charges = ledger.charges()
    assert len(charges) == rounds >= 2
    years = {c["time"][:4] for c in charges}
    assert len(years) >= 2, years  # entries from earlier years still count
    expected = epsilon_of([(SIGMA, RATE, STEPS * rounds)], BUDGET.delta)
    assert charges[-1]["epsilon_after"] == pytest.approx(expected, rel=1e-6)
    assert expected <= BUDGET.epsilon < epsilon_of([(SIGMA, RATE, STEPS * (rounds + 1))], BUDGET.delta)
    # The refused round left no entry, and a later one is refused too, whatever the date.
    clock.years(10)
    with pytest.raises(PrivacyBudgetExceeded):
        book.charge(members, "fundus", _charge(99, 1), BUDGET)
    assert len(ledger.charges()) == rounds
    # A smaller charge that still fits is accepted.
    accountant = book.accountant(members, BUDGET)
    fits = accountant.remaining_steps(SIGMA, RATE)
    if fits:
        book.charge(members, "fundus", _charge(99, 1, steps=fits), BUDGET)
        assert ledger.charges()[-1]["epsilon_after"] <= BUDGET.epsilon


def test_overlapping_datasets_are_charged_together(tmp_path: Path) -> None:
    book = LedgerBook(tmp_path)
    everything, subset, other = _members(16), _members(4, offset=2), _members(8, offset=100)
    book.charge(everything, "fundus", _charge(1, 1), BUDGET)
    book.charge(subset, "fundus", _charge(1, 1, phase="finetune"), BUDGET)  # a task over some of the same images
    book.charge(other, "fundus", _charge(2, 1), BUDGET)
    spent = {s.images: s for s in summarise_ledgers(tmp_path)}
    assert spent[16].entries == 2 and spent[4].entries == 2  # each ledger holds every charge touching it
    assert spent[8].entries == 1
    assert spent[16].epsilon_spent == pytest.approx(epsilon_of([(SIGMA, RATE, 2 * STEPS)], BUDGET.delta))


def test_per_run_spending_and_remaining(tmp_path: Path) -> None:
    book = LedgerBook(tmp_path)
    members = _members()
    for run, rounds in ((7, 2), (8, 1)):
        for rnd in range(1, rounds + 1):
            book.charge(members, "fundus", _charge(run, rnd), BUDGET)
    (summary,) = summarise_ledgers(tmp_path)
    assert summary.modality == "fundus" and summary.entries == 3 and summary.problem is None
    runs = {r.run: r for r in summary.runs}
    assert runs[7].steps == 2 * STEPS and runs[8].steps == STEPS
    assert runs[8].epsilon_alone == pytest.approx(epsilon_of([(SIGMA, RATE, STEPS)], BUDGET.delta))
    assert runs[8].epsilon_after == pytest.approx(summary.epsilon_spent)
    assert summary.remaining == pytest.approx(BUDGET.epsilon - summary.epsilon_spent)


def _ledger_with_entries(folder: Path) -> Path:
    book = LedgerBook(folder)
    for rnd in (1, 2, 3):
        book.charge(_members(), "fundus", _charge(1, rnd, steps=5), BUDGET)
    (ledger,) = book.ledgers()
    return ledger.path


def _edit_epsilon(path: Path) -> None:
    lines = path.read_text().splitlines()
    entry = json.loads(lines[2])
    entry["steps"] = 1  # hide spending
    lines[2] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")


def _drop_middle(path: Path) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + lines[3:]) + "\n")


def _truncate(path: Path) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")


def _garbage(path: Path) -> None:
    with path.open("ab") as handle:
        handle.write(b"\x00{not json\n")


def _delete(path: Path) -> None:
    path.unlink()


def _delete_with_head(path: Path) -> None:
    path.unlink()
    path.with_suffix(".head").unlink()


@pytest.mark.parametrize("damage", [_edit_epsilon, _drop_middle, _truncate, _garbage, _delete, _delete_with_head])
def test_a_damaged_ledger_refuses_to_train_and_says_what_to_do(tmp_path: Path, damage: object) -> None:
    path = _ledger_with_entries(tmp_path)
    damage(path)  # type: ignore[operator]
    book = LedgerBook(tmp_path)
    with pytest.raises(PrivacyLedgerDamaged, match=r"refuses to train.*Restore the ledger folder") as raised:
        book.charge(_members(), "fundus", _charge(2, 1), BUDGET)
    assert str(tmp_path) not in str(raised.value)
    with pytest.raises(PrivacyLedgerDamaged):
        book.verify_all()
    (summary,) = summarise_ledgers(tmp_path)
    assert summary.problem is not None and math.isnan(summary.epsilon_spent)


def test_an_edited_date_breaks_the_chain(tmp_path: Path) -> None:
    path = _ledger_with_entries(tmp_path)
    path.write_text(path.read_text().replace('"time":"20', '"time":"19', 1))
    with pytest.raises(PrivacyLedgerDamaged):
        LedgerBook(tmp_path).verify_all()


def test_a_crash_between_entry_and_head_keeps_the_entry(tmp_path: Path) -> None:
    path = _ledger_with_entries(tmp_path)
    head = path.with_suffix(".head")
    before = head.read_bytes()
    LedgerBook(tmp_path).charge(_members(), "fundus", _charge(2, 1, steps=5), BUDGET)
    head.write_bytes(before)  # the head write never happened
    book = LedgerBook(tmp_path)
    book.verify_all()
    (ledger,) = book.ledgers()
    assert len(ledger.charges()) == 4  # the charge counts (over-counting is safe)
    assert json.loads(head.read_text())["entries"] == 5


def test_a_restored_backup_verifies(tmp_path: Path) -> None:
    path = _ledger_with_entries(tmp_path / "live")
    shutil.copytree(path.parent, tmp_path / "backup")
    _edit_epsilon(path)
    shutil.rmtree(path.parent)
    shutil.copytree(tmp_path / "backup", tmp_path / "live")
    LedgerBook(tmp_path / "live").verify_all()
