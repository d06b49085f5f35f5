"""The full fine-tuning classifier's pooling: [CLS], the mean patch token, or both; old heads load as [CLS]."""

from __future__ import annotations

import pytest
import torch

from visionfm_core.cli.task_data import TaskOptions
from visionfm_core.errors import ConfigError
from visionfm_core.models.heads import EncoderFeatures, LinearHead, build_head
from visionfm_core.tasks.adapters import ClassificationTask, task_from_config


def _features(cls: torch.Tensor, maps: torch.Tensor) -> EncoderFeatures:
    return EncoderFeatures(cls={1: cls}, maps={1: maps}, image=torch.zeros(2, 3, 8, 8))


def test_token_and_average_pooling_read_what_they_say() -> None:
    torch.manual_seed(0)
    cls, maps = torch.randn(2, 8), torch.randn(2, 8, 3, 4)
    other_maps = maps + torch.randn(2, 8, 1, 1)  # a different mean patch token, same [CLS]
    heads = {pool: LinearHead(8, 2, 2, pool=pool) for pool in ("token", "avg", "token+avg")}
    for head in heads.values():
        torch.nn.init.normal_(head.fc.weight)
    assert heads["token+avg"].fc.in_features == 16 and heads["avg"].fc.in_features == 8
    token = heads["token"]
    assert torch.equal(token(_features(cls, maps)), token(_features(cls, other_maps)))  # [CLS] only
    for pool in ("avg", "token+avg"):
        assert not torch.allclose(heads[pool](_features(cls, maps)), heads[pool](_features(cls, other_maps)))
    average = heads["avg"]
    assert torch.allclose(average(_features(cls, maps)), average.fc(maps.mean(dim=(2, 3))))
    assert torch.equal(average(_features(cls, maps)), average(_features(torch.randn(2, 8), maps)))


def test_a_head_saved_before_pooling_existed_loads_as_cls_and_configs_round_trip() -> None:
    old = build_head("linear", {"embed_dim": 8, "depth": 2, "num_outputs": 2, "dropout": 0.0})
    assert isinstance(old, LinearHead) and old.pool == "token" and "pool" not in old.config
    both = LinearHead(8, 2, 2, pool="token+avg")
    rebuilt = build_head("linear", both.config)
    assert isinstance(rebuilt, LinearHead) and rebuilt.pool == "token+avg"
    rebuilt.load_state_dict(both.state_dict())  # same shapes
    for build in (lambda: LinearHead(8, 2, 2, pool="max"), lambda: ClassificationTask(2, pool="max"),
                  lambda: TaskOptions(pool="max")):
        with pytest.raises(ConfigError) as raised:
            build()
        assert raised.value.key == "pool"


def test_the_task_builds_its_pooling_and_keeps_it_in_its_config() -> None:
    task = ClassificationTask(2, mode="binary", pool="token+avg")
    head = task.build_head(8, 2, 4, "full")
    assert isinstance(head, LinearHead) and head.pool == "token+avg"
    again = task_from_config("classification", task.to_config())
    assert isinstance(again, ClassificationTask) and again.pool == "token+avg"
    legacy = {k: v for k, v in task.to_config().items() if k != "pool"}
    assert isinstance(task_from_config("classification", legacy), ClassificationTask)
    assert task.build_head(8, 2, 4, "frozen").kind == "probe"  # the probe keeps VisionFM's [CLS] MLP
