"""DINO/iBOT projection head: MLP (GELU, no BatchNorm) -> L2-normalised bottleneck -> prototypes."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn


class NormalizedLinear(nn.Module):
    """A bias-free linear layer whose rows are unit vectors: weight normalisation with the gain g fixed
    to 1, as DINO freezes it. `weight` plays the role of DINO's `weight_v`."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's default init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Always fp32, even under autocast: the teacher temperature (0.04) multiplies logit rounding errors
        # by 25 inside the softmax, and casting a 65536 x 256 weight to bf16 every call costs more than
        # the fp32 matmul over the few tokens that reach the head.
        with torch.autocast(device_type=x.device.type, enabled=False):
            # x @ (W / |W_k|)^T computed as (x @ W^T) / |W_k|: the same values, but the scaling touches
            # the [tokens, out] output instead of the far bigger [out, in] weight.
            inv_norm = torch.linalg.vector_norm(self.weight, dim=1).clamp_min(1e-12).reciprocal()
            return F.linear(x.float(), self.weight) * inv_norm


class ProjectionHead(nn.Module):
    """`layers` linear layers (in -> hidden ... -> bottleneck), L2-normalise, then `out_dim` prototypes.

    One head serves both [CLS] and patch tokens (iBOT's shared head). `last_layer` is the part that is
    frozen for the first steps of training.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 512, bottleneck_dim: int = 128,
                 layers: int = 3) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(layers, 1) - 1) + [bottleneck_dim]
        modules: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
            modules.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2:
                modules.append(nn.GELU())
        self.mlp = nn.Sequential(*modules)
        self.last_layer = NormalizedLinear(bottleneck_dim, out_dim)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck features the prototypes are compared with."""
        x = self.mlp(x)
        # eps guards the bf16 case where a tiny vector would underflow to a zero norm.
        return F.normalize(x, dim=-1, eps=1e-6 if x.dtype == torch.float32 else 1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.bottleneck(x))  # type: ignore[no-any-return]
