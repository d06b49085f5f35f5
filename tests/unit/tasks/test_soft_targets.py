"""Soft segmentation targets: each class's share of an input pixel survives shrinking where the area
vote loses a thin vessel, the loss trains towards those shares, and rotation turns them with the mask."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from visionfm_core.data.items import ImageItem
from visionfm_core.evaluation.task_metrics import IGNORE_INDEX
from visionfm_core.tasks.adapters import SegmentationTask, task_from_config
from visionfm_core.tasks.data import rotate_record
from visionfm_core.tasks.geometry import Window, resample_label_fractions, resample_labels
from visionfm_core.tasks.samples import TaskSample


def _thin_vessel(flip: bool = False) -> tuple[np.ndarray, Window]:
    """A 1-px vessel (column 20) on 40x40 source pixels, the top 5 rows unlabelled; shown on 16 input
    pixels (scale 0.4: the vessel covers 0.4 of the input column it falls in)."""
    labels = np.zeros((40, 40), dtype=np.uint8)
    labels[:, 20] = 1
    labels[:5] = IGNORE_INDEX
    return labels, Window(0.0, 0.0, 40.0, 16, flip=flip)


def test_fractions_keep_a_vessel_the_area_vote_loses() -> None:
    labels, window = _thin_vessel()
    mask, fractions = resample_label_fractions(labels, window, 2)
    assert torch.equal(mask, resample_labels(labels, window, 2))
    labelled = mask != IGNORE_INDEX
    assert not bool((mask == 1).any())  # the vote erases the vessel ...
    column = fractions[1, 8:, 8]  # ... its share stays: about 2.5 source columns, one of them vessel
    assert bool((column > 0.3).all() and (column < 0.45).all())
    assert not bool(fractions[1, :, :8].any() or fractions[1, :, 9:].any())  # and nowhere else
    assert torch.allclose(fractions.sum(0)[labelled], torch.ones(int(labelled.sum())))
    assert float(fractions[:, ~labelled].abs().sum()) == 0.0  # ignored pixels have no target
    flipped_mask, flipped = resample_label_fractions(labels, _thin_vessel(flip=True)[1], 2)
    assert torch.equal(flipped, fractions.flip(-1)) and torch.equal(flipped_mask, mask.flip(-1))


def _logits(probability: torch.Tensor) -> torch.Tensor:
    logit = torch.log(probability / (1 - probability))
    return torch.stack([torch.zeros_like(logit), logit], 1).requires_grad_()


def test_soft_loss_equals_the_hard_loss_on_whole_pixels_and_pulls_a_thin_vessel_up() -> None:
    labels, window = _thin_vessel()
    mask, fractions = resample_label_fractions(labels, window, 2)
    task = SegmentationTask(2, soft_targets=True)
    logits = torch.randn(1, 2, 16, 16)
    one_hot = F.one_hot(mask.clamp(0, 1), 2).permute(2, 0, 1).float() * (mask != IGNORE_INDEX)
    hard = SegmentationTask(2).loss(logits, {"mask": mask[None]})
    assert torch.allclose(task.loss(logits, {"mask": mask[None], "mask_fractions": one_hot[None]}), hard)
    # The vessel column scored as background (0.05): the hard target pushes it further down, the share up.
    pulls = {}
    for name, batch in (("hard", {"mask": mask[None]}),
                        ("soft", {"mask": mask[None], "mask_fractions": fractions[None]})):
        scores = _logits(torch.full((1, 16, 16), 0.05))
        task.loss(scores, batch).backward()
        assert scores.grad is not None
        pulls[name] = float(-scores.grad[0, 1, 8:, 8].mean())
    assert pulls["hard"] < 0 < pulls["soft"]


def test_soft_loss_ignores_unlabelled_pixels_and_the_setting_round_trips() -> None:
    labels, window = _thin_vessel()
    mask, fractions = resample_label_fractions(labels, window, 2)
    task = SegmentationTask(2, soft_targets=True)
    batch = {"mask": mask[None], "mask_fractions": fractions[None]}
    logits = torch.randn(1, 2, 16, 16)
    changed = logits.clone()
    changed[:, :, :2] = torch.randn(2, 2, 16) * 5  # rows 0-1: the unlabelled top
    assert torch.allclose(task.loss(logits, batch), task.loss(changed, batch))
    restored = task_from_config("segmentation", task.to_config())
    assert isinstance(restored, SegmentationTask) and restored.soft_targets
    # The task's own training targets carry the shares.
    raw = np.where(labels == 1, 255, 0).astype(np.uint8)
    sample = TaskSample(ImageItem("vessel.png"), mask=raw)
    assert float(task.prepare(sample, window, (40, 40))["mask_fractions"][1, 8:, 8].min()) > 0.3
    assert "mask_fractions" not in SegmentationTask(2, soft_targets=False).prepare(sample, window, (40, 40))


def test_rotation_turns_the_fractions_with_the_mask() -> None:
    torch.manual_seed(0)
    mask = torch.zeros(32, 32, dtype=torch.long)
    mask[:, 12:20] = 1  # an 8-px band: whole pixels, so the shares are the mask itself
    record = {"image": torch.rand(3, 32, 32), "mask": mask,
              "mask_fractions": F.one_hot(mask, 2).permute(2, 0, 1).float()}
    rotate_record(record, 30.0)
    rotated, fractions = record["mask"], record["mask_fractions"]
    assert not torch.equal(rotated, mask)  # it did turn
    inside = rotated != IGNORE_INDEX
    agree = (fractions.argmax(0) == rotated)[inside].float().mean()
    assert float(agree) > 0.97  # nearest vs bilinear sampling differ only along the band's edges
