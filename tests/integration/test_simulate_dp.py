"""`visionfm simulate --dp --privacy-epsilon E --mode all`: DP-SGD at every simulated site in pretraining and
fine-tuning, in the federated (Flower + Ray), centralized and local-only arms, each within the same
budgets; one site's own, smaller budget (set in the scenario) refuses its rounds; metrics.csv has an
epsilon per site and round; the report shows spent against budget, with a plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.privacy.accountant import epsilon_of
from client.privacy.ledger import summarise_ledgers
from simulations.cli import app
from strategies.protocol.scenario import SCENARIO_DIR, load_scenario, site_data

pytestmark = pytest.mark.integration

EPSILON = 40.0
RUN_TABLE = """
[run]
num-rounds = 2
local-steps = 1
batch-size = 16
arch = "nano"
image-size = 32
patch-size = 8
knn-k = 10
finetune-rounds = 1
finetune-encoder = "frozen"
finetune-mode = "ordinal"
"ssl.out-dim" = 32
"ssl.head-hidden-dim" = 32
"ssl.head-bottleneck-dim" = 16
"ssl.local-crops" = 0
"privacy.noise-multiplier" = 1.0
"privacy.expected-batch-size" = 16
"privacy.center" = "fixed"
"""


def _small_budget() -> float:
    """hospital-b's own budget: room for its first pretraining round (one DP step), not for a second."""
    train = len(site_data(load_scenario("quick"), 1, 0.2)["fundus"].train)
    return sum(epsilon_of([(1.0, 16 / train, steps)], 1e-5) for steps in (1, 2)) / 2


SMALL = _small_budget()


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dp")
    quick = (SCENARIO_DIR / "quick.toml").read_text()
    scenario = quick[: quick.index("[run]")].replace(
        'name = "hospital-b"\nmodalities = ["fundus"]',
        f'name = "hospital-b"\nmodalities = ["fundus"]\nprivacy-epsilon = {SMALL}')  # its own, smaller budget
    (root / "dp.toml").write_text(scenario + RUN_TABLE)
    result = CliRunner().invoke(app, ["simulate", "--scenario", str(root / "dp.toml"), "--mode", "all",
                                      "--out", str(root / "out"), "--dp", "--privacy-epsilon", str(EPSILON)])
    assert result.exit_code == 0, result.output
    return root / "out"


def _csv(out: Path) -> list[dict[str, str]]:
    with (out / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_federated_sites_spend_within_their_own_budgets_every_phase(run_root: Path) -> None:
    out = run_root / "federated"
    rows = _csv(out)
    spent = [r for r in rows if r["phase"] in ("train", "finetune") and r.get("epsilon")]
    by_site = {(r["site"], r["phase"], r["round"]) for r in spent}
    for site in ("hospital-a", "hospital-c"):
        assert {(site, "train", "1"), (site, "train", "2"), (site, "finetune", "3")} <= by_site
        epsilons = [float(r["epsilon"]) for r in spent if r["site"] == site and r["modality"] == "fundus"]
        assert epsilons == sorted(epsilons) and 0 < epsilons[-1] <= EPSILON  # one ledger over both phases
    refused = [r for r in rows if r["site"] == "hospital-b" and r.get("budget_exhausted") == "1.0"]
    assert {(r["phase"], r["round"]) for r in refused} == {("train", "2"), ("finetune", "3")}
    (first,) = [r for r in spent if r["site"] == "hospital-b"]
    assert first["round"] == "1" and 0 < float(first["epsilon"]) <= SMALL == float(first["epsilon_budget"])
    # Under DP the sites score nothing; the coordinator's held-out test split does.
    assert {r["site"] for r in rows if r["phase"] in ("evaluate", "finetune-evaluate")} == {"global-test"}
    report = (out / "report.md").read_text()
    assert "spent against budget" in report and "privacy-budget.png" in report
    assert (out / "plots" / "privacy-budget.png").is_file()
    line = next(x for x in report.splitlines() if x.startswith("| hospital-b | fundus |"))
    assert f"| {SMALL:.3f} |" in line and line.rstrip().endswith("| 2 |")  # 1 pretraining + 1 fine-tuning refused
    ledgers = {p.parent.name: summarise_ledgers(p) for p in (out / "sites").glob("site-*/privacy")}
    assert set(ledgers) == {"site-0", "site-1", "site-2"}
    assert [s.entries for s in ledgers["site-1"]] == [1]
    fundus_a = max(s.epsilon_spent for s in ledgers["site-0"])
    assert fundus_a == pytest.approx(max(float(r["epsilon"]) for r in spent if r["site"] == "hospital-a"), rel=1e-6)


@pytest.mark.parametrize("arm", ["centralized", "local"])
def test_baseline_arms_train_with_dp_within_the_same_budgets(run_root: Path, arm: str) -> None:
    rows = json.loads((run_root / arm / "metrics.json").read_text())
    spent = [r for r in rows if r["phase"] in ("train", "finetune") and "epsilon" in r]
    assert spent and all(0 < r["epsilon"] <= r["epsilon_budget"] for r in spent)
    assert not any("loss" in r or "finetune_loss" in r for r in spent)  # un-noised numbers are not reported
    if arm == "centralized":
        # Pooled fundus holds hospital-b's images: the strictest budget of its holders; OCT only hospital-c's.
        assert {r["modality"] for r in spent} == {"fundus", "oct"}
        assert all(r["epsilon_budget"] == (pytest.approx(SMALL) if r["modality"] == "fundus" else EPSILON)
                   for r in spent)
        assert list((run_root / arm / "sites" / "pooled" / "privacy").glob("*.jsonl"))
    else:
        assert {r["site"] for r in spent} == {"hospital-a", "hospital-b", "hospital-c"}
        assert all(r["epsilon_budget"] == (pytest.approx(SMALL) if r["site"] == "hospital-b" else EPSILON)
                   for r in spent)
        assert any(r["site"] == "hospital-b" and r.get("budget_exhausted") == 1.0 for r in rows)
        assert len(list((run_root / arm / "sites").glob("site-*/privacy/*.jsonl"))) >= 3
    # Under DP the arms score only the held-out test split, as the federation does.
    assert all(r["site"].endswith("global-test") for r in rows if r["phase"] in ("evaluate", "finetune-evaluate"))
