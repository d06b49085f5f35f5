"""DINO [CLS] self-distillation and iBOT masked patch-token distillation, as pure functions.

Teacher targets are centred and sharpened: softmax((t - c) / T_teacher). The student's log-probs use
T_student. Losses are computed in float32 whatever precision produced the logits. The centre used by
a loss is always the one from earlier batches; `update_center` is applied afterwards (DINO's order,
which also keeps one image from changing another image's gradient within a batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def teacher_probs(teacher_logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """Centred, sharpened teacher distribution over the last dimension (float32)."""
    return F.softmax((teacher_logits.float() - center.float()) / temp, dim=-1)


def dino_cls_loss(student_logits: torch.Tensor, targets: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Mean cross-entropy H(target_i, student_j) over every pair of views i != j.

    student_logits: [V, B, K], all views of a batch, the G teacher views first.
    targets: [G, B, K] teacher probabilities of the global views (G <= V).
    Pairs where the student and the teacher see the same view are skipped.
    """
    views, batch = student_logits.shape[0], student_logits.shape[1]
    global_views = targets.shape[0]
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    # cross[i, j] = mean over the batch of -sum_k t[i, b, k] * log p[j, b, k]: one contraction for all pairs.
    cross = -torch.einsum("gbk,vbk->gv", targets.float(), log_p) / batch
    same_view = torch.zeros(global_views, views, dtype=torch.bool, device=cross.device)
    same_view[:, :global_views] = torch.eye(global_views, dtype=torch.bool, device=cross.device)
    pairs = global_views * views - global_views
    if pairs == 0:
        raise ValueError("dino_cls_loss needs at least one pair of different views")
    return cross.masked_fill(same_view, 0.0).sum() / pairs


def masked_token_weights(masks: torch.Tensor) -> torch.Tensor:
    """Weight of each masked token (in `masks.nonzero()` order) so that a weighted sum of per-token
    cross-entropies equals iBOT's patch loss: mean over the image's masked tokens, then over the batch
    (images without a mask count as 0), then over the views.

    masks: [G, B, N] booleans (view, image, patch).
    """
    views, batch = masks.shape[0], masks.shape[1]
    counts = masks.sum(dim=-1, keepdim=True).clamp(min=1).to(torch.float32)
    per_token = (1.0 / (counts * batch * views)).expand(masks.shape)
    return per_token[masks]


def ibot_patch_loss(student_logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                    student_temp: float) -> torch.Tensor:
    """iBOT's masked-image-modelling loss over the masked tokens only.

    student_logits, targets: [M, K] for the M masked tokens (student saw the mask token, teacher saw
    the patch); weights: [M] from `masked_token_weights`. Zero when nothing is masked.
    """
    if student_logits.shape[0] == 0:
        return student_logits.float().sum() * 0.0
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    per_token = -(targets.float() * log_p).sum(dim=-1)
    return (per_token * weights.to(per_token)).sum()


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float) -> torch.Tensor:
    """center <- momentum * center + (1 - momentum) * mean of the teacher logits over all rows (in place)."""
    batch_center = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1]).mean(dim=0)
    center.mul_(momentum).add_(batch_center.to(center), alpha=1.0 - momentum)
    return center
