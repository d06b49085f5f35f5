"""Federated fine-tuning in deployment: two hospitals (real SuperLink and SuperNodes over TLS, `visionfm-client
join --task-manifest`) pretrain one round, then fine-tune vessel segmentation for two rounds on their own
HRF photographs and masks. Only the encoder and the shared segmentation head leave the sites."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import simulations
from tests.csv_files import write_csv
from tests.integration.deployment.conftest import (
    CoordinatorHandle,
    Federation,
    Processes,
    audit_entries,
    join_site,
    online_nodes,
    site_data,
    wait_until,
    write_deploy_job,
)
from visionfm_core.models.checkpoint import load_encoder
from visionfm_core.tasks.public_sets import hrf_samples

pytestmark = [pytest.mark.integration, pytest.mark.timeout(480)]

SITES = ("hospital-a", "hospital-b")
HRF = Path(simulations.__file__).parent / "data" / "hrf"


def vessel_manifest(folder: Path, first: int, count: int) -> Path:
    """A hospital's own vessel data: HRF photographs (reduced 6x, as a site's export might be) with their
    manual vessel masks, listed in a segmentation manifest."""
    folder.mkdir(parents=True)
    rows = []
    for sample in hrf_samples(HRF, with_vessels=True)[first:first + count]:
        name = Path(sample.source).stem
        with Image.open(sample.source) as image:
            reduced = image.reduce(6)
        reduced.save(folder / f"{name}.png")
        with Image.open(str(sample.mask)) as mask:
            mask.convert("L").resize(reduced.size, Image.Resampling.NEAREST).save(folder / f"{name}_vessels.png")
        rows.append({"image": f"{name}.png", "mask": f"{name}_vessels.png"})
    return write_csv(folder / "vessels.csv", rows)


def test_two_hospitals_fine_tune_vessel_segmentation_from_their_own_manifests(
    coordinator: CoordinatorHandle, federation: Federation, processes: Processes, tmp_path: Path
) -> None:
    data = site_data(tmp_path / "data", count=len(SITES))
    works = {name: tmp_path / f"site-{name}" for name in SITES}
    manifests = {name: vessel_manifest(tmp_path / f"vessels-{name}", 6 * i, 6) for i, name in enumerate(SITES)}
    for name, path in zip(SITES, data, strict=True):
        join_site(processes, federation.bundle(name), path, works[name], "--task-manifest", str(manifests[name]))
    wait_until(lambda: online_nodes(coordinator) >= set(SITES), 120, "both hospitals online")

    settings = json.dumps({"num_classes": 2, "class_names": ["background", "vessel"], "features": 4})
    job = write_deploy_job(tmp_path, "vessels", rounds=1, min_sites=2, round_timeout=120, eval_every=10,
                           extra_run_config=f"finetune-rounds = 2\nfinetune-task = \"segmentation\"\n"
                                            f"finetune-task-config = '{settings}'\nfinetune-batch-size = 4\n"
                                            "finetune-min-steps = 0\n"
                                            # 32 px tiles: a small working scale keeps them few
                                            # (test-time flips are tested in the unit tests)
                                            "finetune-preprocess = '{\"fov_diameter\": 64, "
                                            "\"test_flips\": false}'\n")
    text = job.read_text().replace('name = "vessels"', 'name = "vessels"\nphases = ["pretrain", "fine-tune"]')
    job.write_text(text)
    result = coordinator.cli("run", str(job), timeout=420)
    assert result.returncode == 0, result.stdout + result.stderr
    out = coordinator.state_dir / "runs" / "vessels"
    wait_until(lambda: (out / "report.md").is_file(), 60, "the report")

    rows = json.loads((out / "metrics.json").read_text())
    for ft_round in (1, 2):
        trained = [r for r in rows if r["phase"] == "finetune" and r.get("finetune_round") == ft_round]
        assert len(trained) == 2 and all(0.0 <= r["val_dice"] <= 1.0 for r in trained), trained
    # eval-every 10: the sites score the global model after the last fine-tune round only.
    evaluated = [r for r in rows if r["phase"] == "finetune-evaluate"]
    assert len(evaluated) == 2 and all(r["finetune_round"] == 2 and "dice_vessel" in r for r in evaluated)
    head, meta = load_encoder(out / "finetuned" / "fundus.classifier.safetensors")
    assert meta["task"] == "segmentation" and head
    assert "rejected" not in (out / "report.md").read_text()

    # What each hospital sent while fine-tuning: encoder and head arrays, nothing of the manifest.
    for name in SITES:
        replies = [e for e in audit_entries(works[name], "reply") if e.get("arrays")]
        tuned = [e for e in replies if any("classifier." in a["key"] for a in e["arrays"])]
        assert len(tuned) == 2, [e.get("message_type") for e in replies]
        log_text = (works[name] / "audit.jsonl").read_text()
        assert "vessels.csv" not in log_text and "_vessels.png" not in log_text
    assert np.isfinite([r["finetune_loss"] for r in rows if r["phase"] == "finetune"]).all()
