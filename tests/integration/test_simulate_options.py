"""The same federation with secure aggregation, a robust rule and int8 transport, on Flower's
simulation engine: each variant completes and moves the weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from server.federation.checkpoints import load_round
from server.federation.finetune_phase import finetune_arrays, resolve_finetune_task
from simulations.simulate import simulate
from visionfm_core.models.checkpoint import load_encoder
from visionfm_core.run_config import RunConfig

pytestmark = pytest.mark.integration

ONE_ROUND = {"num-rounds": 1, "local-steps": 1}


def _changed(out: Path) -> bool:
    before, after = load_round(out, 0), load_round(out, 1)
    key = "fundus/backbone.blocks.0.attn.qkv.weight"
    return not np.allclose(before[key], after[key])


def test_secure_aggregation_with_site_level_dp_sums_each_modality_over_enough_sites_only(tmp_path: Path) -> None:
    outcome = simulate("quick", "federated", tmp_path / "secagg", {
        **ONE_ROUND, "secure-aggregation": True, "central-dp-clip": 1.0, "central-dp-noise": 0.8})
    # Fundus is held by three sites: securely aggregated. OCT by one site only: revealing its "sum" would
    # reveal that site's update, so that group aborts and the global OCT encoder stays as it was.
    assert _changed(outcome.out_dir)
    before, after = load_round(outcome.out_dir, 0), load_round(outcome.out_dir, 1)
    assert all(np.array_equal(before[k], after[k]) for k in before if k.startswith("oct/"))
    report = (outcome.out_dir / "report.md").read_text()
    assert "oct group" in report and "needed 2, got 1" in report
    rows = json.loads((outcome.out_dir / "metrics.json").read_text())
    assert {r["site"] for r in rows if r["phase"] == "train"} == {"hospital-a", "hospital-b", "hospital-c"}
    # Noise was added to the securely aggregated mean and the site-level epsilon accounted.
    (dp_row,) = [r for r in rows if r["phase"] == "central-dp"]
    assert dp_row["epsilon"] > 0 and dp_row["noise_multiplier"] == 0.8


def test_sites_from_the_command_line_with_int8_transport_and_the_median_rule(tmp_path: Path) -> None:
    # One simulation for two options that do not interact: five sites instead of the scenario's three
    # (every one must find its partition: sites re-read the resolved scenario from the run folder, not the
    # bundled file), and int8 transport with the coordinate-wise median.
    outcome = simulate("quick", "federated", tmp_path / "five-int8",
                       {**ONE_ROUND, "compression": "int8", "strategy": "median"}, {"sites": 5})
    sites = {f"site-{i}" for i in range(1, 6)}
    rows = json.loads((outcome.out_dir / "metrics.json").read_text())
    assert {r["site"] for r in rows if r["phase"] == "train"} == sites
    assert "rejected" not in (outcome.out_dir / "report.md").read_text()
    assert _changed(outcome.out_dir)
    # Each site holds both modalities here; int8 sends about a quarter of the fp32 bytes of each.
    model = load_round(outcome.out_dir, 0)
    sent = {r["site"]: r["bytes_sent"] for r in rows if r["phase"] == "transport"}
    assert set(sent) == sites
    assert all(0 < sent[s] <= 0.27 * sum(a.nbytes for a in model.values()) for s in sites), sent


def test_secure_aggregation_carries_the_finetuning_phase(tmp_path: Path) -> None:
    # Sites keep their fine-tuning updates and send only masked vectors; the server unmasks each
    # modality's sum over enough sites. The fundus head moves; OCT (one holder) aborts and stays.
    outcome = simulate("quick", "federated", tmp_path / "secagg-ft", {
        **ONE_ROUND, "secure-aggregation": True, "finetune-rounds": 1, "finetune-encoder": "frozen",
        "finetune-mode": "ordinal", "max-update-norm": 5.0, "finetune-min-steps": 0})
    folder = outcome.out_dir / "checkpoints" / "finetune-round-0001"
    initial = finetune_arrays({k: v for k, v in load_round(outcome.out_dir, 1).items()},
                              resolve_finetune_task(RunConfig.from_flat(
                                  json.loads((outcome.out_dir / "config.json").read_text()))))
    head, _ = load_encoder(folder / "fundus.classifier.safetensors")
    assert any(not np.allclose(v.numpy(), initial[f"fundus/classifier.{k}"]) for k, v in head.items())
    oct_head, _ = load_encoder(folder / "oct.classifier.safetensors")
    assert all(np.allclose(v.numpy(), initial[f"oct/classifier.{k}"]) for k, v in oct_head.items())
    rows = json.loads((outcome.out_dir / "metrics.json").read_text())
    assert {r["site"] for r in rows if r["phase"] == "finetune"} == {"hospital-a", "hospital-b", "hospital-c"}
    report = (outcome.out_dir / "report.md").read_text()
    assert "oct group" in report and "hospital" not in " ".join(x for x in report.splitlines() if "rejected" in x)
