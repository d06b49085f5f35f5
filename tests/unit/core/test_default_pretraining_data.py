"""The README's default `visionfm simulate` pretrains the fundus encoder on the bundled high-resolution
photographs (HRF, IDRiD), shared out between the hospitals, never on a task set's held-out test image,
at the size and working scale the dense fine-tuning tasks use; RetinaMNIST stays the probes' data."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from client.training import ssl_loader
from strategies.protocol.datasets import DATA_DIR, load_dataset
from strategies.protocol.scenario import load_scenario, pooled_data, resolve_config, scenario_from_dict, site_data
from strategies.protocol.task_sets import TASK_SETS, load_task_set
from visionfm_core.cli.finetune import finetune_command
from visionfm_core.errors import ConfigError
from visionfm_core.pretraining import ssl_config
from visionfm_core.tasks.adapters import SegmentationTask

PHOTO_FOLDERS = {DATA_DIR / "hrf" / "images", DATA_DIR / "idrid_seg" / "images"}


@pytest.fixture(scope="module")
def scenario():
    return load_scenario("default")


def _fundus_sites(scenario) -> list[int]:
    return [i for i, site in enumerate(scenario.sites) if "fundus" in site.modalities]


def test_each_hospital_pretrains_on_its_own_share_of_the_high_resolution_photographs(scenario) -> None:
    shares = [site_data(scenario, i, 0.2)["fundus"] for i in _fundus_sites(scenario)]
    pool = {item.source for item in load_dataset("fundus-photos").pool}
    sources = [{item.source for item in share.ssl_items} for share in shares]
    assert set().union(*sources) == pool and sum(map(len, sources)) == len(pool)  # disjoint, cover the pool
    for share in shares:
        assert {Path(item.source).parent for item in share.ssl_items} == PHOTO_FOLDERS  # both cameras each
        assert min(item.load().shape[1] for item in share.ssl_items[:3]) >= 1000  # native resolution
        # The probes still score on labelled RetinaMNIST (28 px), not on the photographs.
        assert share.train and all(item.label is not None and item.load().shape[:2] == (28, 28)
                                   for item in share.train[:5])
        assert not {item.source for item in share.train} & pool
    assert len(pooled_data(scenario, 0.2)["fundus"].ssl_items) == len(pool)


def test_no_held_out_test_photograph_of_any_task_set_is_pretrained_on(scenario) -> None:
    held_out = {sample.source for name in TASK_SETS for sample in load_task_set(name).test}
    assert held_out  # the task sets do hold images out
    shares = [site_data(scenario, i, 0.2)["fundus"].ssl_items for i in _fundus_sites(scenario)]
    pretrained = {item.source for share in shares for item in share}
    assert not pretrained & held_out
    # Every photograph that is not held out is used: HRF's 45 and IDRiD's 20 minus the test images.
    assert len(pretrained) == 65 - len(held_out)


def test_the_fundus_encoder_is_pretrained_at_the_dense_tasks_size_and_working_scale(scenario) -> None:
    cfg = resolve_config(scenario, "default", {"batch-size": 2})  # the default's settings, a small batch
    defaults = {name: p.default for name, p in inspect.signature(finetune_command).parameters.items()}
    # The patch size `visionfm finetune` leaves to the task (None): segmentation's own.
    assert defaults["patch_size"] is None
    assert (cfg.image_size, cfg.patch_size) == (defaults["image_size"], SegmentationTask.default_patch_size)
    assert ssl_config(cfg).fov_diameter == SegmentationTask().preprocess_defaults()["fov_diameter"]
    share = site_data(scenario, _fundus_sites(scenario)[0], cfg.val_fraction)["fundus"]
    torch.manual_seed(0)
    views, _ = next(iter(ssl_loader(share, cfg, seed=0)))
    assert [tuple(v.shape[-2:]) for v in views] == [(224, 224)] * 2 + [(96, 96)] * 4
    assert len(views[0]) == 2


def test_pretraining_data_for_a_modality_without_labelled_data_is_refused() -> None:
    raw = {"datasets": {"fundus": "retinamnist"}, "pretrain-data": {"oct": "oct2017"},
           "sites": [{"name": "a", "modalities": ["fundus"]}]}
    with pytest.raises(ConfigError) as raised:
        scenario_from_dict(raw)
    assert raised.value.key == "pretrain-data.oct"
