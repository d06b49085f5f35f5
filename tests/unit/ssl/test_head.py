"""Projection head: L2-normalised bottleneck and a weight-normalised last layer with its gain fixed to 1."""

from __future__ import annotations

import torch
from torch import nn

from visionfm_core.ssl.head import ProjectionHead


def test_logits_are_cosines_between_the_bottleneck_and_unit_prototypes() -> None:
    torch.manual_seed(0)
    head = ProjectionHead(in_dim=16, out_dim=10, hidden_dim=12, bottleneck_dim=6, layers=3)
    x = torch.randn(5, 16)
    with torch.no_grad():
        logits = head(x)
        assert tuple(logits.shape) == (5, 10)
        assert float(logits.abs().max()) <= 1.0 + 1e-5
        bottleneck = nn.functional.normalize(head.mlp(x), dim=-1)
        prototypes = nn.functional.normalize(head.last_layer.weight, dim=1)
        torch.testing.assert_close(logits, bottleneck @ prototypes.T)
        # Rescaling a prototype (the weight_v of weight norm) changes nothing: the gain is fixed to 1.
        head.last_layer.weight.mul_(torch.linspace(0.5, 3.0, 10)[:, None])
        torch.testing.assert_close(head(x), logits)


def test_mlp_depth_and_activations_follow_the_layer_count() -> None:
    three = ProjectionHead(8, 4, hidden_dim=7, bottleneck_dim=3, layers=3)
    linears = [m for m in three.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 7), (7, 7), (7, 3)]
    assert sum(isinstance(m, nn.GELU) for m in three.mlp) == 2
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)) for m in three.mlp)
    one = ProjectionHead(8, 4, hidden_dim=7, bottleneck_dim=3, layers=1)
    assert [type(m) for m in one.mlp] == [nn.Linear]
    assert set(dict(three.named_parameters())) >= {"last_layer.weight"}
    assert three.last_layer.weight.shape == (4, 3)
