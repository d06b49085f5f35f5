"""Soft centreline Dice (clDice): skeletons of known shapes, thin structures weighing by length, and the
segmentation loss term (its gradient on a missed thin vessel, ignored pixels, config)."""

from __future__ import annotations

import torch

from visionfm_core.evaluation.task_metrics import IGNORE_INDEX
from visionfm_core.tasks.adapters import SegmentationTask, task_from_config
from visionfm_core.tasks.adapters.thin_structures import soft_cldice, soft_skeleton


def _bar_and_line() -> torch.Tensor:
    """A 9-px-wide bar (rows 5-13) and a 1-px line (row 25), both 30 px long, on a 40x40 map."""
    mask = torch.zeros(1, 1, 40, 40)
    mask[0, 0, 5:14, 5:35] = 1
    mask[0, 0, 25, 5:35] = 1
    return mask


def _dice(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(2 * (pred * target).sum() / (pred.sum() + target.sum()))


def test_skeleton_of_a_bar_is_its_centre_line_and_a_thin_line_stays_whole() -> None:
    mask = _bar_and_line()
    skeleton = soft_skeleton(mask)
    across_bar = skeleton[0, 0, 5:14, 20]
    assert across_bar.tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0]  # row 9, the bar's middle
    assert bool((skeleton[0, 0, 25, 5:35] == 1).all())
    assert float(skeleton.min()) >= 0 and float(skeleton.max()) <= 1
    # The gradient path (max-pooling) and the no-gradient path (shifted maxima) agree exactly.
    traced = soft_skeleton(mask.clone().requires_grad_())
    assert torch.equal(traced.detach(), skeleton)


def test_cldice_counts_a_missed_thin_vessel_by_its_length_not_its_area() -> None:
    mask = _bar_and_line()
    assert float(soft_cldice(mask, mask)) == 1.0
    no_line = mask.clone()
    no_line[0, 0, 25] = 0
    thinner_bar = mask.clone()
    thinner_bar[0, 0, 5] = 0  # the same 30 pixels, taken from the thick bar's edge
    # Pixel Dice cannot tell the two errors apart ...
    assert abs(_dice(no_line, mask) - _dice(thinner_bar, mask)) < 1e-6
    # ... the centreline Dice loses about a third for the missing vessel and nothing for the edge.
    assert float(soft_cldice(no_line, mask)) < 0.7
    assert float(soft_cldice(thinner_bar, mask)) > 0.99


def _logits_missing_the_line(mask: torch.Tensor) -> torch.Tensor:
    probability = mask[:, 0].clone() * 0.9 + 0.05
    probability[:, 25] = 0.2  # the thin vessel is scored as background
    logit = torch.log(probability / (1 - probability))
    return torch.stack([torch.zeros_like(logit), logit], 1)


def test_skeleton_term_pushes_harder_on_a_missed_thin_vessel() -> None:
    mask = _bar_and_line()
    target = mask[:, 0].long()
    gradients = {}
    for weight in (0.0, 1.0):
        logits = _logits_missing_the_line(mask).requires_grad_()
        SegmentationTask(2, skeleton_weight=weight).loss(logits, {"mask": target}).backward()
        assert logits.grad is not None
        gradients[weight] = logits.grad[0, 1]
    # Descending the loss raises the vessel logit along the missed line, more with the skeleton term.
    line_pull = {w: float(-g[25, 5:35].mean()) for w, g in gradients.items()}
    assert line_pull[0.0] > 0
    assert line_pull[1.0] > 1.5 * line_pull[0.0]


def test_skeleton_term_ignores_pixels_outside_the_labelled_field() -> None:
    mask = _bar_and_line()
    target = mask[:, 0].long()
    target[:, 30:] = IGNORE_INDEX
    task = SegmentationTask(2, skeleton_weight=1.0)
    logits = _logits_missing_the_line(mask)
    changed = logits.clone()
    changed[:, 1, 30:] = torch.randn(10, 40) * 5
    assert torch.allclose(task.loss(logits, {"mask": target}), task.loss(changed, {"mask": target}))
    everything_ignored = torch.full_like(target, IGNORE_INDEX)
    assert torch.isfinite(task.loss(logits, {"mask": everything_ignored}))


def test_skeleton_weight_travels_with_the_config_and_old_configs_load() -> None:
    task = SegmentationTask(2, skeleton_weight=0.25)
    assert task_from_config("segmentation", task.to_config()) == task
    old = task.to_config()
    del old["skeleton_weight"]
    assert task_from_config("segmentation", old).skeleton_weight == SegmentationTask().skeleton_weight
