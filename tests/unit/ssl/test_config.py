"""SSLConfig: validation by key, Flower-style parsing and crop-size resolution."""

from __future__ import annotations

import pytest

from visionfm_core.errors import ConfigError
from visionfm_core.ssl.config import SSLConfig, resolve_crop_sizes


def test_defaults_are_valid_and_round_trip_through_dict() -> None:
    cfg = SSLConfig()
    assert SSLConfig.from_dict(cfg.to_dict()) == cfg


def test_from_dict_accepts_kebab_keys_strings_and_pairs_as_text_or_lists() -> None:
    cfg = SSLConfig.from_dict({
        "objective": "DINO", "out-dim": "256", "mask_ratio": "0.2,0.4", "global_crop_scale": [0.4, 1.0],
        "amp": "false", "local-crop-size": "none", "global_crop_size": 0, "ssl.lr": 1e-3,
    })
    assert cfg.objective == "dino"
    assert cfg.out_dim == 256
    assert cfg.mask_ratio == (0.2, 0.4)
    assert cfg.global_crop_scale == (0.4, 1.0)
    assert cfg.amp is False
    assert cfg.local_crop_size is None and cfg.global_crop_size is None
    assert cfg.lr == 1e-3


@pytest.mark.parametrize(("data", "key"), [
    ({"temperature": 0.1}, "ssl.temperature"),
    ({"objective": "mae"}, "ssl.objective"),
    ({"out_dim": 0}, "ssl.out_dim"),
    ({"out_dim": 2.5}, "ssl.out_dim"),
    ({"mask_ratio": "0.5,0.1"}, "ssl.mask_ratio"),
    ({"mask_ratio": "0.5"}, "ssl.mask_ratio"),
    ({"teacher_temp": 0}, "ssl.teacher_temp"),
    ({"center_momentum": 1.5}, "ssl.center_momentum"),
    ({"global_crops": 1, "local_crops": 0}, "ssl.local_crops"),
    ({"min_lr": 1.0}, "ssl.min_lr"),
    ({"amp": "maybe"}, "ssl.amp"),
])
def test_invalid_values_name_the_key(data: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        SSLConfig.from_dict(data)
    assert info.value.key == key


def test_crop_sizes_default_to_image_size_and_three_sevenths_on_the_patch_grid() -> None:
    assert resolve_crop_sizes(SSLConfig(), 224, 16) == (224, 96)
    assert resolve_crop_sizes(SSLConfig(), 64, 8) == (64, 24)
    assert resolve_crop_sizes(SSLConfig(), 32, 16) == (32, 16)  # never below one patch
    assert resolve_crop_sizes(SSLConfig(global_crop_size=64, local_crop_size=32), 224, 8) == (64, 32)
