import pytest

from visionfm_core.errors import ConfigError
from visionfm_core.run_config import RunConfig


def test_flat_config_round_trips_with_ssl_options() -> None:
    cfg = RunConfig.from_flat({"num-rounds": "4", "modalities": "Fundus, OCT", "ssl.out-dim": 256, "progress": "true"})
    assert cfg.num_rounds == 4 and cfg.progress is True
    assert cfg.modality_list == ["fundus", "oct"]
    assert cfg.ssl == {"out_dim": 256}
    assert RunConfig.from_flat(cfg.to_flat()) == cfg
    assert cfg.total_steps == 4 * cfg.local_steps


@pytest.mark.parametrize(
    ("flat", "key"),
    [({"num-round": 3}, "num-round"), ({"num-rounds": 0}, "num-rounds"), ({"objective": "mae"}, "objective"),
     ({"teacher-sync": "copy"}, "teacher-sync"), ({"local-steps": 2.5}, "local-steps"),
     ({"modalities": "xray"}, "modality")],
)
def test_invalid_keys_and_values_are_named(flat: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flat(flat)
    assert info.value.key == key
