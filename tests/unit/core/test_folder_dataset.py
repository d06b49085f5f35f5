"""A scenario may name a folder of images as a modality's dataset: `test/` is held out, the rest is shared out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from strategies.protocol.datasets import load_dataset
from strategies.protocol.scenario import load_scenario, site_items
from visionfm_core.errors import ConfigError


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = ["path,label"]
    for part, count in (("pool", 6), ("test", 2)):
        (root / part).mkdir(parents=True)
        for i in range(count):
            rel = f"{part}/img{i}.png"
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / rel)
            rows.append(f"{rel},{'healthy' if i % 2 else 'glaucoma'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_the_test_subfolder_is_held_out_and_the_rest_is_shared_out_to_the_sites(tmp_path: Path) -> None:
    root = _folder(tmp_path / "photos")
    dataset = load_dataset(str(root), "fundus")
    assert sorted(Path(i.source).name for i in dataset.test) == ["img0.png", "img1.png"]
    assert all("/test/" not in i.source for i in dataset.pool) and len(dataset.pool) == 6
    assert dataset.class_names == ["glaucoma", "healthy"] and {i.modality for i in dataset.pool} == {"fundus"}
    scenario_file = tmp_path / "s.toml"
    scenario_file.write_text(f'name = "f"\n[datasets]\nfundus = "{root}"\n[partition]\nkind = "iid"\n'
                             '[[sites]]\nname = "a"\nmodalities = ["fundus"]\n[[sites]]\nname = "b"\n'
                             'modalities = ["fundus"]\n')
    shares = site_items(load_scenario(str(scenario_file)), "fundus")
    names = [sorted(Path(i.source).name for i in share) for share in shares]
    assert len(names[0]) == len(names[1]) == 3 and not set(names[0]) & set(names[1])
    assert {Path(i.source).parent.name for share in shares for i in share} == {"pool"}


def test_a_missing_folder_or_one_with_no_pool_is_an_error_naming_the_datasets_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_dataset(str(tmp_path / "nowhere"), "fundus")
    (tmp_path / "empty" / "test").mkdir(parents=True)
    with pytest.raises(ConfigError, match="outside test/"):
        load_dataset(str(tmp_path / "empty"), "fundus")
