"""DINO and iBOT losses, centring and the EMA update against values computed by hand with plain math."""

from __future__ import annotations

import math

import pytest
import torch

from visionfm_core.ssl.ema import ema_update_
from visionfm_core.ssl.losses import (
    dino_cls_loss,
    ibot_patch_loss,
    masked_token_weights,
    teacher_probs,
    update_center,
)


def _softmax(values: list[float], temp: float) -> list[float]:
    exps = [math.exp(v / temp) for v in values]
    return [e / sum(exps) for e in exps]


def _cross_entropy(target: list[float], logits: list[float], temp: float) -> float:
    log_norm = math.log(sum(math.exp(v / temp) for v in logits))
    return -sum(t * (v / temp - log_norm) for t, v in zip(target, logits, strict=True))


def test_teacher_probs_centre_then_sharpen() -> None:
    probs = teacher_probs(torch.tensor([[1.0, 0.0]]), torch.tensor([0.5, 0.0]), temp=0.25)
    assert probs[0].tolist() == pytest.approx(_softmax([0.5, 0.0], 0.25))


def test_dino_loss_averages_cross_entropy_over_pairs_of_different_views() -> None:
    # 2 global views (teacher) + 1 local view (student only), batch of 2, 2 prototypes.
    teacher = [[[1.0, 0.0], [0.0, 2.0]], [[0.0, 1.0], [1.0, 1.0]]]
    student = [[[0.0, 1.0], [3.0, 0.0]], [[1.0, 1.0], [0.0, 0.5]], [[2.0, 0.0], [1.0, -1.0]]]
    center, t_temp, s_temp = [0.5, 0.0], 0.25, 0.5
    targets = [[_softmax([v - c for v, c in zip(image, center, strict=True)], t_temp) for image in view]
               for view in teacher]
    pairs = [(i, j) for i in range(2) for j in range(3) if i != j]
    expected = sum(
        sum(_cross_entropy(targets[i][b], student[j][b], s_temp) for b in range(2)) / 2 for i, j in pairs
    ) / len(pairs)

    probs = teacher_probs(torch.tensor(teacher), torch.tensor(center), t_temp)
    loss = dino_cls_loss(torch.tensor(student), probs, s_temp)
    assert len(pairs) == 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dino_loss_is_differentiable_in_the_student_only() -> None:
    student = torch.randn(3, 2, 4, requires_grad=True)
    targets = torch.softmax(torch.randn(2, 2, 4), dim=-1)
    dino_cls_loss(student, targets, 0.1).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_ibot_patch_loss_averages_masked_tokens_per_image_then_batch_then_views() -> None:
    # 2 views, batch 2, 3 patches, 2 prototypes. View 0: image 0 masks patches 0 and 2, image 1 none.
    # View 1: image 0 masks nothing, image 1 masks patch 1.
    masks = torch.tensor([[[True, False, True], [False, False, False]],
                          [[False, False, False], [False, True, False]]])
    student = torch.tensor([[[[0.0, 1.0], [5.0, 5.0], [2.0, 0.0]], [[1.0, 1.0]] * 3],
                            [[[1.0, 1.0]] * 3, [[9.0, 9.0], [0.5, -0.5], [9.0, 9.0]]]])
    targets = torch.tensor([[[[0.8, 0.2], [0.5, 0.5], [0.1, 0.9]], [[0.5, 0.5]] * 3],
                            [[[0.5, 0.5]] * 3, [[0.5, 0.5], [0.3, 0.7], [0.5, 0.5]]]])
    temp = 0.5
    view0 = ((_cross_entropy([0.8, 0.2], [0.0, 1.0], temp) + _cross_entropy([0.1, 0.9], [2.0, 0.0], temp)) / 2
             + 0.0) / 2
    view1 = (0.0 + _cross_entropy([0.3, 0.7], [0.5, -0.5], temp) / 1) / 2
    expected = (view0 + view1) / 2

    weights = masked_token_weights(masks)
    assert weights.tolist() == pytest.approx([1 / 8, 1 / 8, 1 / 4])
    loss = ibot_patch_loss(student[masks], targets[masks], weights, temp)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_ibot_patch_loss_is_zero_when_nothing_is_masked() -> None:
    masks = torch.zeros(2, 3, 4, dtype=torch.bool)
    empty = torch.zeros(0, 5)
    assert ibot_patch_loss(empty, empty, masked_token_weights(masks), 0.1).item() == 0.0


def test_center_is_an_exponential_moving_average_of_batch_means() -> None:
    center = torch.zeros(2)
    logits = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    update_center(center, logits, momentum=0.9)
    assert center.tolist() == pytest.approx([0.2, 0.3])
    update_center(center, logits.view(1, 2, 2), momentum=0.9)  # any leading shape: mean over rows
    assert center.tolist() == pytest.approx([0.9 * 0.2 + 0.1 * 2.0, 0.9 * 0.3 + 0.1 * 3.0])


def test_ema_update_blends_every_tensor_in_place() -> None:
    teacher = [torch.tensor([1.0, 2.0]), torch.tensor([[4.0]]), torch.tensor([8.0], dtype=torch.float64)]
    student = [torch.tensor([3.0, 6.0]), torch.tensor([[0.0]]), torch.tensor([0.0], dtype=torch.float64)]
    ema_update_(teacher, student, momentum=0.75)
    assert teacher[0].tolist() == pytest.approx([1.5, 3.0])
    assert teacher[1].item() == pytest.approx(3.0)
    assert teacher[2].item() == pytest.approx(6.0)
    assert student[0].tolist() == [3.0, 6.0]  # sources untouched
    ema_update_(teacher, student, momentum=1.0)
    assert teacher[0].tolist() == pytest.approx([1.5, 3.0])


def test_ema_update_rejects_mismatched_tensors() -> None:
    with pytest.raises(ValueError, match="shape"):
        ema_update_([torch.zeros(2)], [torch.zeros(3)], 0.5)
    with pytest.raises(ValueError, match="targets"):
        ema_update_([torch.zeros(2)], [], 0.5)
