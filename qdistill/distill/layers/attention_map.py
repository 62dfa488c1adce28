"""Attention-map distillation: TinyBERT, Jiao et al. (2020), "TinyBERT: Distilling BERT for
Natural Language Understanding", Sec. 3.1, Eq. 7 (``1/h sum_i MSE(A_i^S, A_i^T)`` over the
attention matrices of paired layers), and its KL form from MiniLM, Wang et al. (2020), "MiniLM:
Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained Transformers",
Sec. 3.1 (KL between the teacher's and student's self-attention distributions).

The maps are the attention *probabilities* ``[B, H, T, T]`` a transformers attention module
returns as the second element of its output (eager attention; TinyBERT uses the pre-softmax
scores, which transformers does not expose). When teacher and student have different head
counts, each map is averaged over its heads first. Padded query rows and padded key columns
do not count (``mask`` ``[B, T]``).
"""

from __future__ import annotations

import torch

from qdistill.errors import DataError, QDistillError


def _maps(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[-2:] != teacher.shape[-2:]:
        raise QDistillError(
            f"attention maps must be [batch, heads, tokens, tokens] over the same tokens, got "
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    return student.float(), teacher.float()


def _weights(maps: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """``[B, 1, T, T]`` weights: 1 where both the query and the key are real tokens."""
    if mask is None:
        return None
    b, _, t, _ = maps.shape
    if tuple(mask.shape) != (b, t):
        raise DataError(
            f"padding mask has shape {tuple(mask.shape)} but the attention maps cover "
            f"[batch, tokens] = {(b, t)}; pass the attention_mask of the same batch"
        )
    real = (mask.to(maps.device) != 0).float()
    return (real[:, None, :, None] * real[:, None, None, :]).expand(-1, 1, t, t)


def attention_mse(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error between attention maps, over heads and (real) query-key entries."""
    s, t = _maps(student, teacher)
    diff = (s - t).pow(2)
    w = _weights(diff, mask)
    if w is None:
        return diff.mean()
    return (diff * w).sum() / (w.sum() * diff.shape[1]).clamp_min(1.0)


def attention_kl(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``KL(teacher row || student row)`` per head and real query, summed over the (real) keys,
    averaged over heads and real queries."""
    s, t = _maps(student, teacher)
    w = _weights(s, mask)
    log_s = s.clamp_min(1e-12).log()
    log_t = t.clamp_min(1e-12).log()
    kl_entries = t * (log_t - log_s)
    if w is None:
        return kl_entries.sum(-1).mean()
    rows = (kl_entries * w).sum(-1)  # [B, H, T]; padded keys excluded
    real_rows = w.amax(-1).expand_as(rows)  # 1 on real query rows
    return (rows * real_rows).sum() / real_rows.sum().clamp_min(1.0)
