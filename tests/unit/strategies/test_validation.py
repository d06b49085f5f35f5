"""Always-on reply checks: every kind of bad reply is rejected with the site and key named."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from strategies.fedavg import SiteReply
from strategies.validation import RejectedUpdate, screen_replies, validate_reply


def _reply(global_model: dict[str, np.ndarray], site: str = "node-7", modalities=("fundus", "oct")) -> SiteReply:
    arrays = {k: v + 0.01 for k, v in global_model.items() if k.split("/")[0] in modalities}
    return SiteReply(site, arrays, {m: 10 for m in modalities})


def test_a_well_formed_reply_passes(global_model):
    assert validate_reply(_reply(global_model), global_model, ["fundus", "oct"]) is None
    assert validate_reply(_reply(global_model, modalities=("oct",)), global_model) is None


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected_naming_the_key(global_model, bad):
    reply = _reply(global_model)
    key = "oct/backbone.blocks.0.mlp.fc1.weight"
    reply.arrays[key][3, 4] = bad
    problem = validate_reply(reply, global_model)
    assert problem == RejectedUpdate("node-7", "1 of 2048 values are NaN or Inf", key)


def test_wrong_shape_is_rejected(global_model):
    reply = _reply(global_model)
    key = "fundus/backbone.blocks.0.attn.qkv.bias"
    reply.arrays[key] = np.zeros(95, dtype=np.float32)
    problem = validate_reply(reply, global_model)
    assert problem is not None and problem.key == key and "shape (95,)" in problem.reason


def test_wrong_dtype_is_rejected(global_model):
    reply = _reply(global_model)
    key = "fundus/backbone.cls_token"
    reply.arrays[key] = reply.arrays[key].astype(np.float64)
    problem = validate_reply(reply, global_model)
    assert problem is not None and problem.key == key and "float64" in problem.reason


def test_unknown_key_is_rejected(global_model):
    reply = _reply(global_model)
    reply.arrays["fundus/head.weight"] = np.zeros(3, dtype=np.float32)
    problem = validate_reply(reply, global_model)
    assert problem is not None and problem.key == "fundus/head.weight" and "unknown key" in problem.reason


def test_key_without_modality_prefix_is_rejected(global_model):
    reply = _reply(global_model)
    reply.arrays["cls_token"] = np.zeros(3, dtype=np.float32)
    problem = validate_reply(reply, global_model)
    assert problem is not None and problem.key == "cls_token"


def test_partial_modality_is_rejected_naming_the_missing_key(global_model):
    reply = _reply(global_model)
    del reply.arrays["oct/backbone.cls_token"]
    problem = validate_reply(reply, global_model)
    assert problem is not None and problem.key == "oct/backbone.cls_token" and "missing" in problem.reason


def test_unannounced_modality_is_rejected(global_model):
    problem = validate_reply(_reply(global_model), global_model, announced_modalities=["fundus"])
    assert problem == RejectedUpdate("node-7", "modality the site did not announce", "oct")


@pytest.mark.parametrize("count", [0, -3, 2.5])
def test_bad_example_counts_are_rejected(global_model, count):
    reply = _reply(global_model)
    reply.num_examples["fundus"] = count
    problem = validate_reply(reply, global_model)
    assert problem is not None and problem.key == "fundus"


def test_empty_reply_is_rejected(global_model):
    assert validate_reply(SiteReply("s", {}, {}), global_model) is not None


def test_screen_splits_and_logs_by_site_without_values(global_model, caplog):
    good = _reply(global_model, site="node-1")
    bad = _reply(global_model, site="node-2")
    bad.arrays["fundus/backbone.cls_token"][...] = np.nan
    unannounced = _reply(global_model, site="node-3")
    with caplog.at_level(logging.WARNING, logger="strategies.validation"):
        accepted, rejected = screen_replies(
            [good, bad, unannounced],
            global_model,
            announced={"node-1": ["fundus", "oct"], "node-2": ["fundus", "oct"], "node-3": ["fundus"]},
        )
    assert [r.site for r in accepted] == ["node-1"]
    assert [(r.site, r.key) for r in rejected] == [("node-2", "fundus/backbone.cls_token"), ("node-3", "oct")]
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2 and "node-2" in messages[0] and "node-3" in messages[1]
    # Only keys and counts are logged, never array contents.
    assert all("nan" not in m.lower().replace("nan or inf", "") for m in messages)
    # The accepted reply is untouched: nothing was repaired or lost.
    assert accepted[0] is good
