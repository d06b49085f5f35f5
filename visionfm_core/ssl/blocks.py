"""timm ViT blocks run with fewer passes over memory: the same weights, the same maths, in timm's order.

On a CPU the SSL step's matmuls run near the machine's peak, and much of the rest is memory traffic of
element-wise passes over [tokens, dim] tensors (issue #16). `block_forward` computes a plain timm
`Block` (pre-norm attention + GELU MLP, no layer scale, no QK-norm) with two of those passes removed:

- The residual branch's output projection adds into `x + bias` in place (`addmm_`), instead of
  writing the bias into a new tensor, multiplying into it, then adding the residual in a third pass
  (without autocast: it casts out-of-place ops only).
- q, k and v are taken as `[B, N, 3, H, d].unbind(2)` then transposed: the very same strided views
  timm's `permute(2, 0, 3, 1, 4).unbind(0)` gives to attention, but the backward pass stacks their
  gradients straight into the qkv layout (one copy) instead of stacking then re-laying them out (two).

Blocks of any other shape (layer scale, QK-norm, gated attention, non-GELU MLP, explicit attention)
run timm's own `forward`, so the result is always the block's; stochastic depth keeps timm's residual
form, so its random draws are unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _plain_block(block: nn.Module) -> bool:
    """Whether `block` is the timm pre-norm block this module's fast path computes exactly."""
    attn = getattr(block, "attn", None)
    mlp = getattr(block, "mlp", None)
    if attn is None or mlp is None or not hasattr(block, "norm1") or not hasattr(block, "norm2"):
        return False
    identities = [getattr(block, n, None) for n in ("ls1", "ls2")]
    identities += [getattr(attn, n, None) for n in ("q_norm", "k_norm", "norm")]
    identities += [getattr(mlp, "norm", None)]
    if not all(isinstance(m, nn.Identity) for m in identities):
        return False
    linears = [getattr(attn, "qkv", None), getattr(attn, "proj", None), getattr(mlp, "fc1", None),
               getattr(mlp, "fc2", None)]
    if not all(type(m) is nn.Linear for m in linears):
        return False
    dropouts = [getattr(attn, n, None) for n in ("attn_drop", "proj_drop")]
    dropouts += [getattr(mlp, n, None) for n in ("drop1", "drop2")]
    return (
        getattr(attn, "fused_attn", False) is True
        and getattr(attn, "gate", None) is None
        and all(isinstance(d, nn.Dropout) and d.p == 0.0 for d in dropouts)
        and type(getattr(mlp, "act", None)) is nn.GELU
        and all(isinstance(getattr(block, n, None), nn.Module) for n in ("drop_path1", "drop_path2"))
    )


def _residual_linear(x: torch.Tensor, h: torch.Tensor, linear: nn.Linear, drop_path: nn.Module) -> torch.Tensor:
    """x + drop_path(linear(h)) for x [..., out], h [..., in]."""
    if (not isinstance(drop_path, nn.Identity) or linear.bias is None
            or torch.is_autocast_enabled(x.device.type)):
        # timm's form: stochastic depth scales the branch per sample, and under autocast the in-place
        # matmul below would meet operands of two dtypes (autocast casts out-of-place ops only).
        return x + drop_path(linear(h))
    shape = x.shape
    # (x + b) + h @ W^T: one pass for the bias and residual, then the matmul accumulates into it
    # (beta = 1). The sum is x + (h @ W^T + b) regrouped, equal within float rounding.
    out = (x.reshape(-1, shape[-1]) + linear.bias).addmm_(h.reshape(-1, h.shape[-1]), linear.weight.t())
    return out.view(shape)


def block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`block(x)` for a timm ViT block; the plain pre-norm block takes the fast path above."""
    if not _plain_block(block):
        return block(x)  # type: ignore[no-any-return]
    blk: Any = block  # timm's Block, Attention and Mlp, as _plain_block checked
    attn, mlp = blk.attn, blk.mlp
    batch, tokens, _ = x.shape
    heads, head_dim = int(attn.num_heads), int(attn.head_dim)
    qkv = attn.qkv(blk.norm1(x)).view(batch, tokens, 3, heads, head_dim)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    context = F.scaled_dot_product_attention(q, k, v)
    context = context.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
    x = _residual_linear(x, context, attn.proj, blk.drop_path1)
    hidden = mlp.act(mlp.fc1(blk.norm2(x)))
    return _residual_linear(x, hidden, mlp.fc2, blk.drop_path2)


def blocks_forward(blocks: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a timm `blocks` Sequential (or any iterable of blocks) with `block_forward`."""
    for block in blocks:  # type: ignore[attr-defined]
        x = block_forward(block, x)
    return x
