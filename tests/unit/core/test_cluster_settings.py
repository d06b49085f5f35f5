"""What a simulation asks of Ray: each site's resources from the scenario, and joining a running cluster
(--ray-address) without the settings Ray refuses when it does not start the cluster itself."""

from __future__ import annotations

from typing import Any

import pytest

from simulations.simulate import backend_config, check_ray_address
from strategies.protocol.scenario import SiteResources, load_scenario, scenario_from_dict, scenario_to_dict
from visionfm_core.errors import ConfigError

BASE: dict[str, Any] = {"datasets": {"fundus": "retinamnist"}, "sites": 2}


def test_resources_come_from_the_scenario_and_survive_the_resolved_copy() -> None:
    scenario = scenario_from_dict({**BASE, "resources": {"num-cpus": 2, "num-gpus": 0.25}})
    assert scenario.resources == SiteResources(2.0, 0.25)
    assert scenario_from_dict(scenario_to_dict(scenario)).resources == SiteResources(2.0, 0.25)
    assert load_scenario("quick").resources == SiteResources(1.0, 0.0)  # defaults


@pytest.mark.parametrize(("table", "key"), [({"num-cpus": 0}, "resources.num-cpus"),
                                            ({"num-gpus": -1}, "resources.num-gpus"),
                                            ({"num-cpus": "two"}, "resources.num-cpus"),
                                            ({"gpus": 1}, "resources.gpus")])
def test_bad_resources_name_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        scenario_from_dict({**BASE, "resources": table})
    assert key in str(raised.value)


def test_joining_a_cluster_passes_its_address_and_nothing_ray_refuses() -> None:
    scenario = scenario_from_dict({**BASE, "resources": {"num-cpus": 4, "num-gpus": 1}})
    joined = backend_config(scenario, "10.0.0.1:6379")
    assert joined["client_resources"] == {"num_cpus": 4.0, "num_gpus": 1.0}
    assert joined["init_args"]["address"] == "10.0.0.1:6379"
    assert not {"num_cpus", "num_gpus", "_temp_dir", "resources"} & set(joined["init_args"])
    local = backend_config(scenario, None, "/tmp/ray-x")
    assert local["init_args"]["_temp_dir"] == "/tmp/ray-x" and "address" not in local["init_args"]


@pytest.mark.parametrize("address", ["10.0.0.1", "10.0.0.1:port", ":6379", "host:70000"])
def test_a_malformed_ray_address_is_refused(address: str) -> None:
    with pytest.raises(ConfigError, match="ray-address"):
        check_ray_address(address)
    assert check_ray_address("head.cluster.local:6379") == "head.cluster.local:6379"
