"""Windows map source pixels to network inputs and back exactly; resampling keeps content in place."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visionfm_core.evaluation.task_metrics import IGNORE_INDEX
from visionfm_core.tasks.geometry import (
    Window,
    letterbox,
    logits_to_source,
    random_window,
    resample_image,
    resample_labels,
)


def test_letterbox_keeps_aspect_and_centres_the_image() -> None:
    window = letterbox(height=100, width=200, size=50)
    assert window.scale == pytest.approx(0.25)
    corners = window.to_input(np.array([[0.0, 0.0], [200.0, 100.0]]))
    assert corners.ravel().tolist() == pytest.approx([0.0, 12.5, 50.0, 37.5])


@pytest.mark.parametrize("flip", [False, True])
def test_points_and_boxes_round_trip(flip: bool) -> None:
    window = Window(x0=-10.0, y0=20.0, side=300.0, size=64, flip=flip)
    points = np.array([[5.0, 7.0], [250.0, 120.0]])
    assert window.to_source(window.to_input(points)) == pytest.approx(points)
    boxes = np.array([[10.0, 30.0, 50.0, 90.0]])
    moved = window.boxes_to_input(boxes)
    assert (moved[:, 2:] > moved[:, :2]).all()  # corners stay ordered after mirroring
    assert window.boxes_to_source(moved) == pytest.approx(boxes)
    assert Window.from_tensor(window.as_tensor()) == window


def test_resampled_image_puts_a_bright_square_where_the_window_says() -> None:
    image = np.zeros((120, 200, 3), dtype=np.uint8)
    image[40:60, 150:170] = 255  # centre (160, 50) in source pixels
    window = letterbox(120, 200, 100)
    tensor = resample_image(image, window)
    assert tensor.shape == (3, 100, 100)
    ys, xs = torch.nonzero(tensor[0] > 0.5, as_tuple=True)
    centre = window.to_input(np.array([160.0, 50.0]))
    assert float(xs.float().mean()) + 0.5 == pytest.approx(centre[0], abs=1.0)
    assert float(ys.float().mean()) + 0.5 == pytest.approx(centre[1], abs=1.0)
    assert float(tensor[:, :15].abs().sum()) == 0.0  # letterbox bars above the image are black


def test_mirrored_window_mirrors_the_image() -> None:
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    plain = resample_image(image, Window(0, 0, 32, 32))
    mirrored = resample_image(image, Window(0, 0, 32, 32, flip=True))
    assert torch.allclose(mirrored, plain.flip(-1))


def test_labels_resample_by_area_vote_and_outside_is_ignored() -> None:
    labels = np.zeros((40, 80), dtype=np.uint8)
    labels[:, 40:] = 1
    labels[0:4, 0:4] = IGNORE_INDEX
    out = resample_labels(labels, letterbox(40, 80, 20), num_classes=2)
    assert out.shape == (20, 20)
    assert (out[:5] == IGNORE_INDEX).all() and (out[15:] == IGNORE_INDEX).all()  # bars
    assert out[5, 0] == IGNORE_INDEX  # the 4x4 ignored corner is exactly one output pixel
    body = out[5:15].clone()
    body[0, 0] = 0
    assert (body[:, :10] == 0).all() and (body[:, 10:] == 1).all()


def test_zoomed_window_crops_inside_the_letterbox() -> None:
    torch.manual_seed(0)
    for _ in range(20):
        window = random_window(100, 200, 32, max_zoom=1.5, flip=True)
        base = letterbox(100, 200, 32)
        assert base.side / 1.5 - 1e-9 <= window.side <= base.side
        assert window.x0 >= base.x0 - 1e-9 and window.x0 + window.side <= base.x0 + base.side + 1e-9


def test_logits_map_back_to_every_source_pixel() -> None:
    labels = np.zeros((30, 50), dtype=np.int64)
    labels[5:20, 10:35] = 1
    window = letterbox(30, 50, 100)  # enlarging: every source pixel covers 2x2 inputs
    target = resample_labels(labels.astype(np.uint8), window, 2)
    logits = torch.stack([(target == 0).float(), (target == 1).float()])
    back = logits_to_source(logits, window, 30, 50).argmax(0).numpy()
    assert back.shape == (30, 50)
    assert (back == labels).mean() > 0.98
