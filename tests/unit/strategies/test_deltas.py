"""Deltas from the global model and their norms."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.deltas import apply_delta, clip_to_norm, delta, l2_norm


def test_delta_and_apply_delta_are_inverse(rng, global_model):
    update = {k: v + rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in global_model.items()}
    change = delta(update, global_model)
    assert all(change[k].dtype == np.float32 for k in change)
    rebuilt = apply_delta(global_model, change)
    assert all(np.allclose(rebuilt[k], update[k], atol=1e-6) for k in update)


def test_partial_changes_keep_the_other_arrays(global_model):
    key = "oct/backbone.cls_token"
    rebuilt = apply_delta(global_model, {key: np.ones_like(global_model[key])})
    assert np.allclose(rebuilt[key], global_model[key] + 1)
    assert rebuilt["fundus/backbone.cls_token"] is global_model["fundus/backbone.cls_token"]


def test_keys_missing_from_the_reference_are_named(global_model):
    with pytest.raises(KeyError, match="fundus/new"):
        delta({"fundus/new": np.zeros(2, np.float32)}, global_model)
    with pytest.raises(KeyError, match="fundus/new"):
        apply_delta(global_model, {"fundus/new": np.zeros(2, np.float32)})


def test_norm_and_clipping():
    arrays = {"a": np.array([3.0], np.float32), "b": np.array([[4.0]], np.float32)}
    assert l2_norm(arrays) == pytest.approx(5.0)
    clipped, norm = clip_to_norm(arrays, 1.0)
    assert norm == pytest.approx(5.0) and l2_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    same, _ = clip_to_norm(arrays, 10.0)
    assert np.array_equal(same["b"], arrays["b"])
    with pytest.raises(ValueError):
        clip_to_norm(arrays, 0.0)
