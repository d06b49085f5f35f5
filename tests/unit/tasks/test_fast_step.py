"""The cheaper segmentation training step computes what the plain operations computed: the label
shares (three classes per Pillow call), the vote's winner, the field of view's inside, one rotation
pass for the image and its soft targets, 2x2 max pooling, and AdamW's fused kernel."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tests.unit.tasks.helpers import tiny_encoder
from visionfm_core.evaluation.task_metrics import IGNORE_INDEX
from visionfm_core.models.heads import MaxPool2x2
from visionfm_core.tasks.adapters import SegmentationTask
from visionfm_core.tasks.data import rotate_record
from visionfm_core.tasks.geometry import (
    Window,
    _first_largest,
    box_shares,
    resample_inside,
    resample_label_fractions,
    resample_labels,
)
from visionfm_core.tasks.trainer import FineTuneConfig, FineTuner, parameter_groups

WINDOWS = [
    Window(3.3, 5.7, 41.5, 16),  # shrinks (box filter over several source pixels)
    Window(-6.0, 10.2, 20.0, 24, flip=True),  # enlarges, mirrored, partly off the image
    Window(30.0, -4.0, 33.0, 16, height=10),  # not square, off the top
    Window(500.0, 500.0, 20.0, 16),  # off the image: all ignored / outside
]


def test_three_planes_per_pillow_call_give_each_plane_its_own_shares() -> None:
    planes = np.random.default_rng(0).random((5, 37, 29)) < 0.3
    shares = box_shares(planes, 11, 13)
    for plane, share in zip(planes, shares, strict=True):
        alone = Image.fromarray(plane.astype(np.uint8) * 255).resize((11, 13), Image.Resampling.BOX)
        np.testing.assert_array_equal(share, np.asarray(alone))


def test_the_winner_is_argmax_with_ties_to_the_first() -> None:
    votes = np.random.default_rng(1).integers(0, 4, (3, 20, 20)).astype(np.uint8)  # many ties
    np.testing.assert_array_equal(_first_largest(votes), votes.argmax(0))


@pytest.mark.parametrize("window", WINDOWS)
def test_inside_is_the_area_vote_of_the_region(window: Window) -> None:
    region = np.random.default_rng(2).random((40, 60)) < 0.5
    expected = resample_labels(region.astype(np.uint8), window, 2) == 1
    assert torch.equal(resample_inside(region, window), expected)


@pytest.mark.parametrize("window", WINDOWS)
def test_label_fractions_match_one_pillow_call_per_class(window: Window) -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, (40, 60)).astype(np.uint8)
    labels[rng.random((40, 60)) < 0.1] = IGNORE_INDEX
    mask, fractions = resample_label_fractions(labels, window, 3)
    # The reference: each code's box share on its own, the first largest code wins.
    canvas = torch.full((window.rows, window.size), IGNORE_INDEX, dtype=torch.long)
    left, top = max(0, math.floor(window.x0)), max(0, math.floor(window.y0))
    right = min(60, math.ceil(window.x0 + window.side))
    bottom = min(40, math.ceil(window.y0 + window.source_height))
    if right > left and bottom > top:
        crop = labels[top:bottom, left:right]
        size = (max(1, round((right - left) * window.scale)), max(1, round((bottom - top) * window.scale)))
        votes = np.stack([
            np.asarray(Image.fromarray(((crop == c) * 255).astype(np.uint8)).resize(size, Image.Resampling.BOX))
            for c in (0, 1, 2, IGNORE_INDEX)
        ])
        codes = np.array([0, 1, 2, IGNORE_INDEX])[votes.argmax(0)]
        y0, x0 = round((top - window.y0) * window.scale), round((left - window.x0) * window.scale)
        ys, xs = slice(max(0, y0), min(window.rows, y0 + size[1])), slice(max(0, x0), min(window.size, x0 + size[0]))
        canvas[ys, xs] = torch.from_numpy(codes)[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    if window.flip:
        canvas = canvas.flip(-1)
    assert torch.equal(mask, canvas)
    assert torch.equal(mask, resample_labels(labels, window, 3))
    labelled = mask != IGNORE_INDEX
    assert torch.allclose(fractions.sum(0)[labelled], torch.ones(int(labelled.sum())))


def test_one_rotation_pass_turns_image_and_fractions_as_separate_passes_did() -> None:
    torch.manual_seed(4)
    image, mask = torch.rand(3, 24, 24), torch.randint(0, 2, (24, 24))
    fractions = torch.stack([1 - mask.float(), mask.float()])
    record = {"image": image.clone(), "mask": mask.clone(), "mask_fractions": fractions.clone()}
    torch.manual_seed(5)
    rotate_record(record, 20.0)
    torch.manual_seed(5)
    angle = math.radians(float((torch.rand(1) * 2 - 1) * 20.0))
    theta = torch.tensor([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0]])[None]
    grid = F.affine_grid(theta, [1, 3, 24, 24], align_corners=False)
    assert torch.equal(record["image"], F.grid_sample(image[None], grid, align_corners=False)[0])
    assert torch.equal(record["mask_fractions"], F.grid_sample(fractions[None], grid, align_corners=False)[0])
    turned = F.grid_sample((mask.float() + 1)[None, None], grid, mode="nearest", align_corners=False)[0, 0].long() - 1
    assert torch.equal(record["mask"], torch.where(turned < 0, torch.full_like(turned, IGNORE_INDEX), turned))


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 2, 7, 9)])
def test_max_pool_matches_pytorch_values_and_gradients_ties_included(shape: tuple[int, ...]) -> None:
    torch.manual_seed(6)
    for values in (torch.randn(shape), torch.randint(0, 3, shape).float()):  # integers: many ties
        grad = torch.randn(*shape[:2], shape[2] // 2, shape[3] // 2)
        ours, theirs = values.clone().requires_grad_(), values.clone().requires_grad_()
        out = MaxPool2x2()(ours)
        expected = nn.MaxPool2d(2)(theirs)
        assert torch.equal(out, expected)
        out.backward(grad)
        expected.backward(grad)
        assert torch.equal(ours.grad, theirs.grad)
        with torch.no_grad():
            assert torch.equal(MaxPool2x2()(values), expected)


def test_the_trainer_uses_fused_adamw_and_it_steps_as_the_plain_one() -> None:
    torch.manual_seed(7)
    task = SegmentationTask(2)
    tuner = FineTuner(task, FineTuneConfig(lr=1e-2, layer_decay=1.0), "cpu")
    model = tuner.build_model(tiny_encoder(32))
    twin = copy.deepcopy(model)
    state = tuner.init_state(model, total_steps=10)
    assert state.optimizer.defaults["fused"] is True
    plain = torch.optim.AdamW(parameter_groups(twin, tuner.config), lr=1e-2, foreach=False)
    images, masks = torch.randn(2, 3, 32, 32), torch.randint(0, 2, (2, 32, 32))
    for _ in range(3):
        for net, optimiser in ((model, state.optimizer), (twin, plain)):
            optimiser.zero_grad()
            task.loss(net(images), {"mask": masks}).backward()
            optimiser.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
